"""What a model takes in memory, for a daemon holding several under one memory budget: its
weights' bytes known before it loads (its safetensors files) and once loaded (its parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def weights_on_disk(path: Path) -> int:
    """The bytes of a model directory's *.safetensors files (links followed: a Hugging Face
    snapshot links to its blobs): about what its weights take once loaded. 0: none there."""
    return sum(file.stat().st_size for file in Path(path).glob("*.safetensors"))


def parameter_bytes(model: Any) -> int:
    """The bytes of a loaded model's parameters (quantized weights with their scales and biases)."""
    from mlx.utils import tree_flatten  # MLX only where a model is loaded: the CLI imports this module

    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))

"""Cut an mlx-lm prompt cache into per-block arrays, and rebuild a prompt cache from them.

Only caches whose state is a per-token sequence can be cut at any block boundary. Layer
caches that carry a running summary (recurrent state, sliding windows) cannot, and a
model that has them is refused here rather than guessed at.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

BlockArrays = dict[str, mx.array]
Layout = dict[str, tuple[tuple[int, ...], str]]  # array name -> (one-token shape, dtype)


class UnsupportedCache(Exception):
    """The model's prompt cache cannot be sliced into reusable blocks."""


def check_sliceable(prompt_cache: list[Any]) -> None:
    for i, layer in enumerate(prompt_cache):
        if type(layer) is not mlx_cache.KVCache:
            raise UnsupportedCache(f"layer {i} uses {type(layer).__name__}, which kvtier cannot slice")


def probe_layout(model: Any) -> Layout:
    """Per-array (shape of a one-token slice, dtype) of this model's KV, from one forward pass.

    Restored blocks are checked against this before use, so a file of another shape or
    dtype is a miss instead of a crash or garbage attention.
    """
    prompt_cache = mlx_cache.make_prompt_cache(model)
    check_sliceable(prompt_cache)
    model(mx.array([[0]]), cache=prompt_cache)
    arrays = slice_block(prompt_cache, 0, 1)
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}



def cached_tokens(prompt_cache: list[Any]) -> int:
    return prompt_cache[0].offset if prompt_cache else 0


def slice_block(prompt_cache: list[Any], start: int, end: int) -> BlockArrays:
    """Copies of every layer's keys/values for tokens [start, end), independent of the cache."""
    arrays: BlockArrays = {}
    for i, layer in enumerate(prompt_cache):
        arrays[f"{i}.keys"] = mx.contiguous(layer.keys[..., start:end, :])
        arrays[f"{i}.values"] = mx.contiguous(layer.values[..., start:end, :])
    mx.eval(list(arrays.values()))
    return arrays


def rebuild(model: Any, blocks: list[BlockArrays], num_tokens: int) -> list[Any]:
    """A fresh prompt cache holding the first `num_tokens` tokens of the concatenated blocks."""
    prompt_cache = mlx_cache.make_prompt_cache(model)
    if not blocks:
        return prompt_cache
    for i, layer in enumerate(prompt_cache):
        layer.keys = mx.concatenate([b[f"{i}.keys"] for b in blocks], axis=2)
        layer.values = mx.concatenate([b[f"{i}.values"] for b in blocks], axis=2)
        layer.offset = layer.keys.shape[2]
        layer.trim(layer.offset - num_tokens)
    mx.eval([a for layer in prompt_cache for a in (layer.keys, layer.values)])
    return prompt_cache


def block_nbytes(arrays: BlockArrays) -> int:
    return sum(a.nbytes for a in arrays.values())


def matches_layout(arrays: BlockArrays, layout: Layout, num_tokens: int) -> bool:
    """True when a restored block has exactly the names, shapes and dtypes this model makes."""
    if set(arrays) != set(layout):
        return False
    return all(tuple(arrays[k].shape) == shape[:2] + (num_tokens,) + shape[3:]
               and str(arrays[k].dtype) == dtype for k, (shape, dtype) in layout.items())

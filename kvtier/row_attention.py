"""Decode attention row by row: a batched row attends over its own keys only.

A `BatchKVCache` left-pads shorter rows and masks the padding; under OpenBLAS the longer key
axis changes the order of the attention's reductions, so a row's numbers depend on its
neighbours (docs/benchmarks.md, "Batch invariance"). At query length 1 each row's attention
here runs over `keys[i:i+1, :, left_padding[i]:]` with no mask: the very shapes a lone decode
runs. Neighbouring rows with the same padding (the same length) attend in one call over
`keys[i:j, :, pad:]`: each row's products and reductions are those of its own one-row call
(a batch of matrices is a loop of the same per-row kernels), and a batch of 8 equal rows
makes 8 calls per step instead of 64. Everything else falls through to mlx-lm's own function.
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache

_original = mlx_base.scaled_dot_product_attention


def scaled_dot_product_attention(queries: mx.array, keys: Any, values: Any, cache: Any, scale: float,
                                 mask: Any, **extra: Any) -> mx.array:
    pads = getattr(cache, "left_padding", None)
    if not isinstance(cache, mlx_cache.BatchKVCache) or queries.shape[2] != 1 or pads is None:
        return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, **extra)
    given = {k: v for k, v in extra.items() if v is not None}  # attention sinks, in mlx-lm versions with them
    rows = [mx.fast.scaled_dot_product_attention(queries[i:j], keys[i:j, :, p:], values[i:j, :, p:],
                                                 scale=scale, mask=None, **given)
            for i, j, p in equal_runs(pads.tolist())]
    return rows[0] if len(rows) == 1 else mx.concatenate(rows)


def equal_runs(pads: list[int]) -> list[tuple[int, int, int]]:
    """(first row, row after the last, padding) of each run of neighbouring rows padded alike."""
    runs: list[tuple[int, int, int]] = []
    for i, pad in enumerate(pads):
        if runs and runs[-1][2] == pad:
            runs[-1] = (runs[-1][0], i + 1, pad)
        else:
            runs.append((i, i + 1, pad))
    return runs


def install() -> None:
    """Swap it into every loaded mlx-lm model module that imported mlx-lm's function (call
    once the model is loaded: its module is imported by then). Installing twice is harmless."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "scaled_dot_product_attention", None) is _original:
            module.scaled_dot_product_attention = scaled_dot_product_attention  # type: ignore[attr-defined]

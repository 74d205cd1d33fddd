"""Cut an mlx-lm prompt cache into per-block arrays and boundary snapshots, and rebuild it.

Two kinds of layer cache:
- sliced: a per-token sequence (KVCache, QuantizedKVCache). Any block of tokens can be cut
  out and concatenated back, so these layers are stored as blocks.
- snapshot: a running summary of every token so far (ArraysCache for SSM / linear attention,
  RotatingKVCache for sliding windows, ChunkedKVCache, CacheList). It cannot be cut; its
  whole state is copied at chosen boundaries and restored only at exactly that boundary.
Every cache type is read and restored only through mlx-lm's own protocol: the `state` and
(before mlx-lm 0.32) `meta_state` properties and their setters, in the order `from_state` uses.
A state that is not a tree of arrays and plain values is refused (UnsupportedCache), never
guessed at.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache

from .config import SNAPSHOT_FORMAT

BlockArrays = dict[str, mx.array]
Layout = dict[str, tuple[tuple[int, ...], str]]  # array name -> (one-token shape, dtype name)

SLICED_TYPES = (mlx_cache.KVCache, mlx_cache.QuantizedKVCache)

# mlx-lm before 0.32 splits a cache's state in two: arrays in `state`, everything else as
# strings in `meta_state` (RotatingKVCache's offset and ring position among them); 0.32
# keeps it all in `state`.
SPLIT_STATE = hasattr(mlx_cache.KVCache, "meta_state")


class UnsupportedCache(Exception):
    """The model's prompt cache cannot be reused exactly."""


@dataclass(frozen=True)
class CachePlan:
    """Which layers are cut into blocks and which are snapshotted, for one model."""

    sliced: tuple[int, ...]
    snapshot: tuple[int, ...]
    classes: tuple[str, ...]
    quantization: "Quantization | None" = None

    @property
    def needs_snapshots(self) -> bool:
        return bool(self.snapshot)


def plan_for(prompt_cache: list[Any], quantization: "Quantization | None" = None) -> CachePlan:
    sliced = tuple(i for i, c in enumerate(prompt_cache) if type(c) in SLICED_TYPES)
    snapshot = tuple(i for i in range(len(prompt_cache)) if i not in sliced)
    return CachePlan(sliced, snapshot, tuple(type(c).__name__ for c in prompt_cache), quantization)


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int = 64


def make_cache(model: Any, quantization: Quantization | None = None) -> list[Any]:
    """The model's own prompt cache; with quantization, its KVCache layers quantized from
    the first token (other layer types keep their own format)."""
    prompt_cache = mlx_cache.make_prompt_cache(model)
    if quantization is None:
        return prompt_cache
    return [mlx_cache.QuantizedKVCache(quantization.group_size, quantization.bits)
            if type(layer) is mlx_cache.KVCache else layer for layer in prompt_cache]


def probe(model: Any, quantization: Quantization | None = None) -> tuple[CachePlan, Layout]:
    """Run one token through a fresh cache: the per-layer plan and the one-token block layout.

    Restored blocks are checked against the layout before use, so a file of another shape
    or dtype is a miss instead of a crash or garbage attention. Snapshot states are packed
    once here so that an unsupported state type is refused up front.
    """
    prompt_cache = make_cache(model, quantization)
    plan = plan_for(prompt_cache, quantization)
    model(mx.array([[0]]), cache=prompt_cache)
    mx.eval(state_arrays(prompt_cache))
    take_snapshot(prompt_cache, plan)  # raises UnsupportedCache for unknown state shapes
    arrays = slice_block(prompt_cache, plan, 0, 1)
    return plan, {name: (tuple(a.shape), dtype_name(a.dtype)) for name, a in arrays.items()}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def host_view(array: mx.array | np.ndarray) -> np.ndarray:
    """A numpy view of an evaluated array's memory, without a copy; numpy has no bfloat16,
    so such arrays are seen as their uint16 bits."""
    if isinstance(array, np.ndarray):
        return array
    return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)


def cached_tokens(prompt_cache: list[Any]) -> int | None:
    """Tokens a sliced layer holds (None for models without one)."""
    for layer in prompt_cache:
        if type(layer) in SLICED_TYPES:
            return layer.offset
    return None


# -- sliced layers: blocks ----------------------------------------------------------------
def _parts(value: Any) -> list[mx.array]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def slice_block(prompt_cache: list[Any], plan: CachePlan, start: int, end: int) -> BlockArrays:
    """Copies of every sliced layer's keys/values for tokens [start, end)."""
    arrays: BlockArrays = {}
    for i in plan.sliced:
        keys, values = prompt_cache[i].state[:2]  # (keys, values, ...) in either mlx-lm form
        for kind, value in (("keys", keys), ("values", values)):
            for j, part in enumerate(_parts(value)):
                arrays[f"{i}.{kind}.{j}"] = mx.contiguous(part[..., start:end, :])
    mx.eval(list(arrays.values()))
    return arrays


def matches_layout(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], layout: Layout,
                   num_tokens: int) -> bool:
    """True when a block has exactly the names, shapes and dtypes this model makes."""
    if set(shapes) != set(layout) or set(dtypes) != set(layout):
        return False
    return all(tuple(shapes[k]) == shape[:2] + (num_tokens,) + shape[3:] and dtypes[k] == dtype
               for k, (shape, dtype) in layout.items())


class PromptBuffers:
    """The sliced layers' keys and values for one request, allocated once at its full size.

    Cached blocks are copied straight into them as they arrive (from RAM, or from files
    still being read), and the prefill then writes the rest in place: no concatenation, no
    growing the cache chunk by chunk. The copies go through numpy views of the MLX memory,
    before any MLX computation uses it; `attach` hands the arrays to a cache exactly once.
    """

    def __init__(self, layout: Layout, capacity: int):
        self.num_tokens = 0
        self.capacity = _round_up(max(capacity, 1), mlx_cache.KVCache.step)
        self._arrays = {name: mx.zeros(shape[:2] + (self.capacity,) + shape[3:], getattr(mx, dtype))
                        for name, (shape, dtype) in layout.items()}
        mx.async_eval(list(self._arrays.values()))  # the memory is touched while blocks load
        self._views: dict[str, np.ndarray] | None = None
        self._attached = False

    @classmethod
    def of(cls, layout: Layout, blocks: list[BlockArrays], capacity: int = 0) -> "PromptBuffers":
        sizes = [next(iter(b.values())).shape[2] if b else 0 for b in blocks]
        buffers = cls(layout, max(capacity, sum(sizes)))
        for block, size in zip(blocks, sizes):
            buffers.add(block, size)
        return buffers

    def add(self, arrays: dict[str, Any], num_tokens: int) -> None:
        """Append the first `num_tokens` tokens of a block (MLX arrays or numpy views)."""
        start, end = self.num_tokens, self.num_tokens + num_tokens
        views = self._host_views()
        if end > self.capacity or set(arrays) != set(views):
            raise ValueError("block does not fit these buffers")
        for name, array in arrays.items():
            views[name][:, :, start:end] = host_view(array)[:, :, :num_tokens]
        self.num_tokens = end

    def views_at(self, start: int, num_tokens: int) -> dict[str, np.ndarray]:
        """Writable views of tokens [start, start + num_tokens) of every buffer, for a block
        file read straight into them (on any thread; made on the MLX thread, as they wait
        for the zero-fill). They count as held only once `claim`ed."""
        views = self._host_views()
        if start + num_tokens > self.capacity:
            raise ValueError("block does not fit these buffers")
        return {name: view[:, :, start : start + num_tokens] for name, view in views.items()}

    def claim(self, start: int, num_tokens: int) -> None:
        """Append `num_tokens` tokens already written in place, at `start`, through `views_at`."""
        assert not self._attached, "buffers already attached to a cache"
        assert start == self.num_tokens, "a block read in place must be the next one"
        if start + num_tokens > self.capacity:
            raise ValueError("block does not fit these buffers")
        self.num_tokens += num_tokens

    def _host_views(self) -> dict[str, np.ndarray]:
        assert not self._attached, "buffers already attached to a cache"
        if self._views is None:
            self._views = {name: host_view(a) for name, a in self._arrays.items()}
        return self._views

    def attach(self, layer: Any, i: int, num_tokens: int) -> None:
        """Give a fresh KVCache / QuantizedKVCache layer its buffers, holding `num_tokens`."""
        assert num_tokens <= self.num_tokens, "the buffers hold fewer tokens than asked for"
        self._views, self._attached = None, True  # no more writes: from here MLX owns the memory
        keys, values = (self._take(i, kind, type(layer) is mlx_cache.KVCache) for kind in ("keys", "values"))
        hold_tokens(layer, keys, values, num_tokens)

    def _take(self, i: int, kind: str, single: bool) -> Any:
        names = sorted((n for n in self._arrays if n.startswith(f"{i}.{kind}.")), key=_part_number)
        parts = [self._arrays.pop(name) for name in names]
        return parts[0] if single else tuple(parts)


def hold_tokens(layer: Any, keys: Any, values: Any, num_tokens: int) -> None:
    """Set a fresh KVCache / QuantizedKVCache to hold the first `num_tokens` tokens of buffers
    that may be longer (the prefill then writes on in place), through its own setters."""
    quantized = (layer.group_size, layer.bits) if type(layer) is mlx_cache.QuantizedKVCache else ()
    if not SPLIT_STATE:
        layer.state = (keys, values, num_tokens, *quantized)
        return
    layer.state = (keys, values)
    if quantized:
        layer.meta_state = tuple(str(n) for n in (num_tokens, *quantized))
    else:  # KVCache's setter counts the whole buffer as tokens: trim it to those held
        layer.trim(keys.shape[2] - num_tokens)


def cache_nbytes(prompt_cache: list[Any]) -> int:
    """Bytes a prompt cache's layers occupy, buffers at their full size. Not mlx-lm's own
    `nbytes`: QuantizedKVCache's raises NameError on mlx-lm 0.31.2 (a missing import)."""
    def layer_bytes(layer: Any) -> int:
        if isinstance(layer, mlx_cache.CacheList):
            return cache_nbytes(layer.caches)
        if isinstance(layer, (mlx_cache.KVCache, mlx_cache.QuantizedKVCache, mlx_cache.RotatingKVCache)):
            arrays = (layer.keys, layer.values)  # `state` would slice them to the offset
        else:
            arrays = layer.state
        return sum(a.nbytes for _, a in tree_flatten(arrays) if isinstance(a, mx.array))
    return sum(layer_bytes(layer) for layer in prompt_cache)


def trim_to(prompt_cache: list[Any], plan: CachePlan, num_tokens: int) -> None:
    """Wind a used cache's sliced layers back to their first `num_tokens` tokens, through
    mlx-lm's own trim: the buffers keep their size, the next tokens overwrite what was past.
    Snapshot layers cannot be wound back: a caller trims only to the tokens they have seen."""
    for i in plan.sliced:
        layer = prompt_cache[i]
        layer.trim(layer.offset - num_tokens)


def _part_number(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# -- snapshot layers ----------------------------------------------------------------------

@dataclass
class Snapshot:
    arrays: BlockArrays
    skeleton: str  # JSON: format, mlx-lm version, classes, state trees with arrays as names

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _pack(node: Any, arrays: BlockArrays, name: str) -> Any:
    if isinstance(node, mx.array):
        # A new handle: caches update some arrays in place (x[..., i] = y), which would
        # otherwise rewrite the snapshot too.
        arrays[name] = mx.array(node)
        return {"array": name}
    if isinstance(node, (list, tuple)):
        return {"tuple" if isinstance(node, tuple) else "list":
                [_pack(x, arrays, f"{name}.{i}") for i, x in enumerate(node)]}
    if isinstance(node, dict) and all(isinstance(k, str) for k in node):
        return {"dict": {k: _pack(x, arrays, f"{name}.{k}") for k, x in node.items()}}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise UnsupportedCache(f"cache state holds a {type(node).__name__}, which kvtier cannot store")


def _unpack(node: dict, arrays: BlockArrays) -> Any:
    if "array" in node:
        return mx.array(arrays[node["array"]])  # the live cache must not alias the stored one
    if "list" in node:
        return [_unpack(x, arrays) for x in node["list"]]
    if "tuple" in node:
        return tuple(_unpack(x, arrays) for x in node["tuple"])
    if "dict" in node:
        return {k: _unpack(x, arrays) for k, x in node["dict"].items()}
    return node["value"]


def layer_state(layer: Any) -> dict[str, Any]:
    """A cache layer's whole state as mlx-lm hands it out: `state`, and `meta_state` where
    this mlx-lm has one."""
    return {"state": layer.state, "meta_state": layer.meta_state} if SPLIT_STATE else {"state": layer.state}


def set_layer_state(layer: Any, state: dict[str, Any]) -> None:
    """Restore what `layer_state` gave, through the setters, in `from_state`'s order."""
    layer.state = state["state"]
    if SPLIT_STATE:
        layer.meta_state = state["meta_state"]


def _snapshot_origin() -> dict[str, Any]:
    # A state's layout is mlx-lm's own and changes between its versions (0.32 folded
    # meta_state into state). Both are in the fingerprint too (blocks.model_fingerprint), so
    # another version's snapshot is never looked up: one that claims otherwise is damaged.
    return {"format": SNAPSHOT_FORMAT, "mlx_lm": mlx_lm.__version__}


def _snapshot_header(plan: CachePlan) -> dict[str, Any]:
    return dict(_snapshot_origin(), classes={str(i): plan.classes[i] for i in plan.snapshot})


def take_snapshot(prompt_cache: list[Any], plan: CachePlan) -> Snapshot:
    """The full state of every snapshot layer, as it is now, in arrays of its own."""
    arrays: BlockArrays = {}
    trees = {str(i): _pack(layer_state(prompt_cache[i]), arrays, f"s{i}") for i in plan.snapshot}
    mx.eval(list(arrays.values()))
    return Snapshot(arrays, json.dumps(dict(_snapshot_header(plan), states=trees), sort_keys=True))


def snapshot_matches(skeleton: str, plan: CachePlan) -> bool:
    """True when a snapshot is of this format, taken by this mlx-lm, for this model's
    snapshot layers."""
    try:
        stored = json.loads(skeleton)
        return all(stored[k] == v for k, v in _snapshot_header(plan).items())
    except (ValueError, KeyError, TypeError):
        return False


# -- rebuild ------------------------------------------------------------------------------
def rebuild(model: Any, plan: CachePlan, buffers: PromptBuffers, num_tokens: int,
            snapshot: Snapshot | None) -> list[Any]:
    """A fresh prompt cache holding the first `num_tokens` tokens (maybe none): sliced layers
    in the request's buffers, snapshot layers from a snapshot taken at exactly `num_tokens`."""
    prompt_cache = make_cache(model, plan.quantization)
    for i in plan.sliced:
        buffers.attach(prompt_cache[i], i, num_tokens)
    if num_tokens == 0:
        return prompt_cache
    if plan.needs_snapshots:
        assert snapshot is not None, "snapshot layers need a snapshot at the restore point"
        restore_snapshot(prompt_cache, plan, snapshot)
    mx.eval(state_arrays(prompt_cache))
    return prompt_cache


def restore_snapshot(prompt_cache: list[Any], plan: CachePlan, snapshot: Snapshot) -> None:
    """Set every snapshot layer of a fresh cache to the snapshot's state, through the setters."""
    states = json.loads(snapshot.skeleton)["states"]
    for i in plan.snapshot:
        set_layer_state(prompt_cache[i], _unpack(states[str(i)], snapshot.arrays))


def state_arrays(prompt_cache: list[Any]) -> list[mx.array]:
    return [v for _, v in tree_flatten([c.state for c in prompt_cache]) if isinstance(v, mx.array)]


def held_bytes(prompt_cache: list[Any], plan: CachePlan, layout: Layout, num_tokens: int) -> int:
    """What a cache's first `num_tokens` tokens occupy as a restore counts them: the sliced
    layers' bytes per token (the layout's), and the snapshot layers' whole state."""
    per_token = sum(math.prod(shape) * getattr(mx, dtype).size for shape, dtype in layout.values())
    return per_token * num_tokens + cache_nbytes([prompt_cache[i] for i in plan.snapshot])


def nbytes(arrays: BlockArrays) -> int:
    return sum(a.nbytes for a in arrays.values())

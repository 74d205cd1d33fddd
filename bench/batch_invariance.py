"""Where does batched decode differ from decoding alone, and what does keeping it exact cost?

Part 1 (bisection): one request (row 0, a 37-token prompt) is decoded alone, as plain mlx-lm
does (`model(token, cache=KVCache)`, then `logits - logsumexp`), and beside neighbours of other
prompt lengths; each stage changes one thing, and the table gives the largest |logprob
difference| of row 0 at each decode step and the first step where one appears:
- the product's path: kvtier prefills alone, inserts the cache with the prompt's last token
  into mlx-lm's `BatchGenerator` (BatchKVCache.merge/extend, left padding, masks), whose pass
  gives the first token;
- mlx-lm's own batched prefill (right padding, `finalize`'s roll), as `mlx_lm.server` does;
- the prefill's chunk size, alone;
- the model's forward at M = 1 vs M = k rows of the *same* request (no padding, no mask);
- one row in a BatchKVCache with no padding (mask array, per-row rope offsets) and with left
  padding (the attention's keys are longer, the real ones shifted);
- the candidates: attention computed per row over its own keys (`per_row_attention`), and that
  at a fixed width of 8 rows (padding rows), compared with the same request at width 8 alone.
Part 2 (--timing): decode tokens/s of the candidates against the batched and interleaved paths.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        nice -n 10 python bench/batch_invariance.py [--cases llama,qwen3_next,llama-kv8] [--timing llama]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvtier import row_attention  # noqa: E402
from kvtier.decode import RowDecoder  # noqa: E402
from kvtier.kvstate import Quantization, make_cache  # noqa: E402
from tests.support.testmodels import make_model  # noqa: E402

# case: (architecture, KV quantization, hidden size and layers, or None for the defaults)
CASES: dict[str, tuple[str, Quantization | None, tuple[int, int] | None]] = {
    "llama": ("llama", None, None),  # 512 x 8
    "qwen3_next": ("qwen3_next", None, None),
    "llama-kv8": ("llama", Quantization(8), None),  # the daemon's --kv-bits 8
    # Projections big enough that OpenBLAS takes its ordinary GEMM path at M = 1 too.
    "llama-wide": ("llama", None, (2048, 2)),
}
TARGET_LENGTH = 37
NEIGHBOUR_LENGTHS = [5, 60, 20, 90, 12, 44, 70]  # row 0's left padding grows with the width
WIDTHS = (2, 4, 8)
FIXED_WIDTH = 8
Logprobs = list[mx.array]


def prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 4000, length).tolist()


def logprobs_of(logits: mx.array) -> mx.array:
    logits = logits[:, -1, :]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def max_diffs(got: Logprobs, ref: Logprobs) -> list[float]:
    return [float(mx.max(mx.abs(a - b)).item()) for a, b in zip(got, ref)]


# -- caches ------------------------------------------------------------------------------
def prefilled(model: Any, tokens: list[int], quant: Quantization | None, chunk: int = 2048) -> list[Any]:
    """A prompt cache holding tokens[:-1], computed alone (as the daemon's prefill is)."""
    cache = make_cache(model, quant)
    body = tokens[:-1]
    for start in range(0, len(body), chunk):
        model(mx.array(body[start:start + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def stacked(caches: list[list[Any]]) -> list[Any]:
    """The rows' caches as one batch cache per layer: mlx-lm's `merge` where it has one
    (KVCache -> BatchKVCache, left-padded to the longest), else the states concatenated
    along the batch axis (QuantizedKVCache, which mlx-lm cannot merge; equal lengths only)."""
    out = []
    for layers in zip(*caches):
        first = layers[0]
        if hasattr(first, "merge"):
            out.append(first.merge(list(layers)))
            continue
        merged = type(first)(first.group_size, first.bits)
        merged.keys, merged.values = (tuple(mx.concatenate(parts) for parts in zip(*(getattr(c, kind) for c in layers)))
                                      for kind in ("keys", "values"))
        merged.offset = first.offset
        out.append(merged)
    return out


def left_padded(batch_cache: list[Any], pad: int) -> list[Any]:
    """Add `pad` empty positions to the left of every BatchKVCache row (others unchanged)."""
    for layer in batch_cache:
        if isinstance(layer, mlx_cache.BatchKVCache):
            widths = [(0, 0), (0, 0), (pad, 0), (0, 0)]
            layer.keys, layer.values = mx.pad(layer.keys, widths), mx.pad(layer.values, widths)
            layer.left_padding = layer.left_padding + pad
            layer._idx += pad
    return batch_cache


class RightPaddedKVCache(mlx_cache.KVCache):
    """A lone row whose attention reads `pad` masked empty keys after its own (the layout of
    a batch whose rows are left-aligned): does the amount of padding change the numbers?"""

    def __init__(self, layer: mlx_cache.KVCache, pad: int):
        super().__init__()
        self.keys, self.values, self.offset, self.pad = layer.keys, layer.values, layer.offset, pad

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        super().update_and_fetch(keys, values)
        end = self.offset + self.pad
        if self.keys.shape[2] < end:
            grow = [(0, 0), (0, 0), (0, end - self.keys.shape[2]), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, grow), mx.pad(self.values, grow)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        return (mx.arange(self.offset + N + self.pad) < self.offset + N)[None, None, None]


# -- decode loops --------------------------------------------------------------------------
def decode_alone(model: Any, tokens: list[int], steps: int, quant: Quantization | None,
                 chunk: int = 2048) -> tuple[Logprobs, list[int]]:
    """Plain mlx-lm's lone decode, greedy: each step's logprobs and the tokens fed."""
    cache, token, out, fed = prefilled(model, tokens, quant, chunk), tokens[-1], [], []
    for _ in range(steps):
        fed.append(token)
        out.append(logprobs_of(model(mx.array([[token]]), cache=cache))[0])
        token = int(mx.argmax(out[-1]).item())
    return out, fed


def decode_rows(model: Any, batch_cache: list[Any], fed: list[list[int]], width: int | None = None) -> Logprobs:
    """Row 0's logprobs over a batch fed given tokens (GenerationBatch._step's arithmetic);
    `width` pads with copies of the last row's token up to a fixed number of rows."""
    out = []
    for step in range(len(fed[0])):
        column = [f[step] for f in fed]
        column += [column[-1]] * ((width or len(column)) - len(column))
        out.append(logprobs_of(model(mx.array(column)[:, None], cache=batch_cache))[0])
        mx.eval(out[-1])
    return out


@contextlib.contextmanager
def per_row_attention() -> Iterator[None]:
    """Decode attention computed row by row over each row's own keys (a BatchKVCache's left
    padding cut off, no mask): the very shapes a lone decode runs. kvtier's own
    (kvtier/row_attention.py, which Engine installs for good), swapped into every loaded
    mlx-lm model module that imported base.scaled_dot_product_attention, for this block only."""
    original, sdpa = mlx_base.scaled_dot_product_attention, row_attention.scaled_dot_product_attention
    modules = [m for name, m in sys.modules.items()
               if name.startswith("mlx_lm.models.") and getattr(m, "scaled_dot_product_attention", None) is original]
    for module in modules:
        module.scaled_dot_product_attention = sdpa  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.scaled_dot_product_attention = original  # type: ignore[attr-defined]


def product_path(model: Any, prompts: list[list[int]], steps: int, quant: Quantization | None) -> Logprobs:
    """Row 0 through kvtier's batched path: prefill alone, then into mlx-lm's BatchGenerator
    with the prompt's last token as input (kvtier.scheduler.Scheduler._join: the batch's pass
    gives the first token), decode."""
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=len(prompts))
    uids = []
    try:
        for tokens in prompts:
            (uid,) = generator.insert([tokens[-1:]], max_tokens=[steps], caches=[prefilled(model, tokens, quant)],
                                      all_tokens=[tokens[:-1]])
            uids.append(uid)
        return _row_logprobs(generator, uids[0], steps, [])
    finally:
        generator.close()


def _row_logprobs(generator: BatchGenerator, uid: int, steps: int, out: Logprobs) -> Logprobs:
    while len(out) < steps:
        responses = generator.next_generated()
        if not responses:
            break
        out += [r.logprobs for r in responses if r.uid == uid]
    return out


def server_prefill_path(model: Any, prompts: list[list[int]], steps: int) -> Logprobs:
    """Row 0 as mlx_lm.server computes it: whole prompts inserted, prefilled together by the
    generator (right padding, then `finalize` rolls it to the left)."""
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts))
    try:
        uids = generator.insert(prompts, max_tokens=[steps] * len(prompts))
        return _row_logprobs(generator, uids[0], steps, [])
    finally:
        generator.close()


# -- part 1: the bisection table -----------------------------------------------------------
def fmt(diffs: list[float]) -> str:
    first = next((i + 1 for i, d in enumerate(diffs) if d), None)
    steps = " ".join("0" if not d else f"{d:.0e}" for d in diffs)
    return f"{max(diffs, default=0.0):.3g} | {first or '-'} | {steps}"


def bisect(model: Any, quant: Quantization | None, steps: int) -> list[tuple[str, str]]:
    target = prompt(TARGET_LENGTH, 0)
    neighbours = [prompt(n, i + 1) for i, n in enumerate(NEIGHBOUR_LENGTHS)]
    ref, fed = decode_alone(model, target, steps, quant)
    rows: list[tuple[str, str]] = []

    def add(label: str, got: Logprobs, against: Logprobs = ref) -> None:
        rows.append((label, fmt(max_diffs(got, against))))

    batchable = all(hasattr(c, "merge") for c in make_cache(model, quant))
    if batchable:
        for k in WIDTHS:
            add(f"product path: BatchGenerator, width {k} (steps 2+ batched)",
                product_path(model, [target, *neighbours[:k - 1]], steps, quant))
        if quant is None:
            for k in WIDTHS:
                add(f"mlx-lm's batched prefill (mlx_lm.server), width {k}",
                    server_prefill_path(model, [target, *neighbours[:k - 1]], steps))
    else:
        rows.append(("product path", "n/a: mlx-lm cannot merge these caches (the daemon interleaves)"))
    add("alone, prefill in 16-token chunks instead of one", decode_alone(model, target, steps, quant, chunk=16)[0])
    for k in WIDTHS:
        add(f"forward M=1 vs M={k}: {k} copies of the request, no padding",
            decode_rows(model, stacked([prefilled(model, target, quant) for _ in range(k)]), [fed] * k))
    if batchable:
        rows += _padding_rows(model, target, neighbours, fed, ref, quant)
    return rows


def _padding_rows(model: Any, target: list[int], neighbours: list[list[int]], fed: list[int], ref: Logprobs,
                  quant: Quantization | None) -> list[tuple[str, str]]:
    rows = []
    for pad in (0, 3, 50):
        got = decode_rows(model, left_padded(stacked([prefilled(model, target, quant)]), pad), [fed])
        rows.append((f"width 1 in a BatchKVCache, left padding {pad}", fmt(max_diffs(got, ref))))
    right = {pad: decode_rows(model, [RightPaddedKVCache(layer, pad) if isinstance(layer, mlx_cache.KVCache) else layer
                                      for layer in prefilled(model, target, quant)], [fed])
             for pad in (3, 50, 219)}
    for pad in (3, 50):
        rows.append((f"width 1, right padding {pad} (masked keys after its own)", fmt(max_diffs(right[pad], ref))))
        rows.append((f"width 1, right padding {pad} vs right padding 219", fmt(max_diffs(right[pad], right[219]))))
    alone_fixed = _fixed_width(model, target, [], fed, quant)
    for k in WIDTHS:
        got = _fixed_width(model, target, neighbours[:k - 1], fed, quant)
        rows.append((f"fixed width {FIXED_WIDTH} (no per-row attention), {k - 1} neighbours vs the same alone "
                     f"at width {FIXED_WIDTH}", fmt(max_diffs(got, alone_fixed))))
    with per_row_attention():
        for k in WIDTHS:
            got = product_path(model, [target, *neighbours[:k - 1]], len(ref), quant)
            rows.append((f"candidate: product path + per-row attention, width {k}", fmt(max_diffs(got, ref))))
        alone_fixed = _fixed_width(model, target, [], fed, quant)
        rows.append((f"candidate: per-row attention at fixed width {FIXED_WIDTH}, alone vs plain mlx-lm",
                     fmt(max_diffs(alone_fixed, ref))))
        for k in WIDTHS:
            got = _fixed_width(model, target, neighbours[:k - 1], fed, quant)
            rows.append((f"candidate: fixed width {FIXED_WIDTH} + per-row attention, {k - 1} neighbours "
                         f"vs the same alone at width {FIXED_WIDTH}", fmt(max_diffs(got, alone_fixed))))
    return rows


def _fixed_width(model: Any, target: list[int], neighbours: list[list[int]], fed: list[int],
                 quant: Quantization | None) -> Logprobs:
    """Row 0 decoded in a batch padded to FIXED_WIDTH rows (padding rows: a 2-token prompt)."""
    fillers = [prompt(2, 99)] * (FIXED_WIDTH - 1 - len(neighbours))
    others = [*neighbours, *fillers]
    caches = [prefilled(model, p, quant) for p in (target, *others)]
    return decode_rows(model, stacked(caches), [fed, *([p[-1]] * len(fed) for p in others)])


# -- part 2: timing ------------------------------------------------------------------------
def copied(cache: list[Any]) -> list[Any]:
    """A KVCache prompt cache's copy (new arrays: decoding into it leaves the original intact)."""
    out = []
    for layer in cache:
        copy = mlx_cache.KVCache()
        copy.keys, copy.values = layer.keys[..., :layer.offset, :], layer.values[..., :layer.offset, :]
        copy.offset = layer.offset
        out.append(copy)
    return out


def loop_rate(model: Any, caches: list[list[Any]], real: int, steps: int) -> float:
    """Decode tokens/s of the first `real` rows of a merged batch cache, greedy
    (GenerationBatch._step's arithmetic without its bookkeeping)."""
    cache = stacked([copied(c) for c in caches])
    tokens = mx.zeros((len(caches),), dtype=mx.uint32)
    mx.eval([c.state for c in cache])
    started = time.perf_counter()
    for _ in range(steps):
        tokens = mx.argmax(logprobs_of(model(tokens[:, None], cache=cache)), axis=-1)
        mx.async_eval(tokens)
        tokens.tolist()  # the host reads each step's tokens, as the generator does
    return real * steps / (time.perf_counter() - started)


def generator_rate(model: Any, caches: list[list[Any]], steps: int, interleaved: bool) -> float:
    """Aggregate decode tokens/s through the product's decoders: mlx-lm's BatchGenerator
    (the default) or kvtier's RowDecoder (--exact, where batching is not bit-identical)."""
    n = len(caches)
    gen: Any = RowDecoder(model) if interleaved else BatchGenerator(model, stop_tokens=[], completion_batch_size=n)
    gen.insert([[0]] * n, max_tokens=[steps + 2] * n, caches=[copied(c) for c in caches],
               all_tokens=[[0]] * n, samplers=[lambda x: mx.argmax(x, axis=-1)] * n)
    gen.next()  # the generator's first call only moves the rows into its decode batch
    started, produced = time.perf_counter(), 0
    for _ in range(steps):
        produced += len(gen.next()[1])
    gen.close()
    return produced / (time.perf_counter() - started)


def setups(model: Any, steps: int) -> dict[str, Callable[[list[list[Any]]], float]]:
    """The decode configurations timed, by label; each takes the real rows' prefilled caches."""
    def fixed(caches: list[list[Any]]) -> list[list[Any]]:
        return caches + [caches[0]] * (FIXED_WIDTH - len(caches))  # padding rows: any cache will do

    def rows(run: Callable[[], float]) -> float:
        with per_row_attention():
            return run()

    return {
        "interleaved (RowDecoder, --exact)": lambda cs: generator_rate(model, cs, steps, True),
        "batched (BatchGenerator + per-row attention, the default)":
            lambda cs: rows(lambda: generator_rate(model, cs, steps, False)),
        "batched (BatchGenerator, mlx-lm's attention)": lambda cs: generator_rate(model, cs, steps, False),
        BASELINE: lambda cs: loop_rate(model, cs, len(cs), steps),
        "batched + per-row attention": lambda cs: rows(lambda: loop_rate(model, cs, len(cs), steps)),
        f"fixed width {FIXED_WIDTH}": lambda cs: loop_rate(model, fixed(cs), len(cs), steps),
        f"fixed width {FIXED_WIDTH} + per-row attention":
            lambda cs: rows(lambda: loop_rate(model, fixed(cs), len(cs), steps)),
    }


BASELINE = "batched, bare loop"


def timing(model: Any, steps: int, repeats: int) -> list[str]:
    """Median aggregate decode tokens/s per configuration and N, and each one's median ratio
    to the bare batched loop measured in the same repeat: every repeat runs each
    configuration once, in turn, so a shared machine's drift falls on all of them alike."""
    lengths = (300, 120, 420, 200, 350, 150, 260, 380)
    caches = [prefilled(model, prompt(n, 50 + i), None) for i, n in enumerate(lengths)]
    configs = setups(model, steps)
    rates: dict[str, list[str]] = {label: [] for label in configs}
    ratios: dict[str, list[str]] = {label: [] for label in configs}
    for n in (1, 2, 4, 8):
        runs: dict[str, list[float]] = {label: [] for label in configs}
        for _ in range(repeats):
            for label, run in configs.items():
                runs[label].append(run(caches[:n]))
        for label, got in runs.items():
            rates[label].append(f"{statistics.median(got):.0f}")
            ratios[label].append(f"{statistics.median(g / b for g, b in zip(got, runs[BASELINE])):.2f}")
    header = "| decode, {} | N=1 | N=2 | N=4 | N=8 |\n| --- | ---: | ---: | ---: | ---: |"
    lines = [header.format("aggregate tokens/s (median)")]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rates.items()]
    lines += ["", header.format(f"x {BASELINE} in the same repeat (median)")]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in ratios.items()]
    print("\n".join(lines), flush=True)
    return lines


def load(case: str) -> tuple[Any, Quantization | None]:
    arch, quant, size = CASES[case]
    hidden, layers = size or (None, None)
    path = make_model(ROOT / ".models" / (f"{arch}-{hidden}x{layers}" if size else arch), arch,
                      hidden=hidden, layers=layers)
    return mlx_lm.load(str(path))[0], quant


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", default="llama,qwen3_next,llama-kv8", help=f"of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=8, help="decode steps compared")
    parser.add_argument("--timing", default="", help="cases whose decode tokens/s to measure (e.g. llama)")
    parser.add_argument("--timing-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {mx.default_device()}; row 0: a {TARGET_LENGTH}-token "
          f"prompt; neighbours {NEIGHBOUR_LENGTHS[:FIXED_WIDTH - 1]} tokens; float32\n")
    for case in [c for c in args.cases.split(",") if c]:
        model, quant = load(case)
        print(f"### {case}\n\n| stage | max abs diff | first step | per step |\n| --- | ---: | ---: | --- |")
        for label, cells in bisect(model, quant, args.steps):
            print(f"| {label} | {cells} |", flush=True)
        print()
    for case in [c for c in args.timing.split(",") if c]:
        model, _ = load(case)
        print(f"### {case}: decode, {args.timing_steps} steps per run, {args.repeats} repeats; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start\n")
        timing(model, args.timing_steps, args.repeats)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")


if __name__ == "__main__":
    main()

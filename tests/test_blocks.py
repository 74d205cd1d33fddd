"""Block keys: canonical, chained, salted by the model; sizes parse with units."""

import os

import pytest

from kvtier.blocks import blas_library, block_refs, chain_keys, encode_tokens, model_fingerprint, root_key, runtime
from kvtier.config import parse_size


def test_keys_cover_whole_prefix_and_only_full_blocks():
    tokens = list(range(1000))
    keys = chain_keys(tokens, 256, "fp")
    assert len(keys) == 3  # the last 232 tokens do not fill a block
    assert chain_keys(tokens[:768], 256, "fp") == keys
    changed = [7] + tokens[1:]
    assert all(a != b for a, b in zip(chain_keys(changed, 256, "fp"), keys))
    late = tokens[:600] + [9] + tokens[601:]
    assert chain_keys(late, 256, "fp")[:2] == keys[:2] and chain_keys(late, 256, "fp")[2] != keys[2]


def test_keys_are_salted_by_fingerprint_and_encoding_is_canonical():
    tokens = list(range(512))
    assert chain_keys(tokens, 256, "model-a") != chain_keys(tokens, 256, "model-b")
    assert encode_tokens([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    refs = block_refs(tokens, 256, "fp")
    assert refs[1].parent == refs[0].key and [r.index for r in refs] == [0, 1]


def test_fingerprint_changes_with_weights_config_dtype_and_block_size(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      " + b"\x01" * 4096)
    base = model_fingerprint(tmp_path, "float32", 256)
    assert base == model_fingerprint(tmp_path, "float32", 256)
    assert base != model_fingerprint(tmp_path, "bfloat16", 256)
    assert base != model_fingerprint(tmp_path, "float32", 128)
    (tmp_path / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      " + b"\x02" * 4096)
    weights_changed = model_fingerprint(tmp_path, "float32", 256)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "x": 1}')
    assert len({base, weights_changed, model_fingerprint(tmp_path, "float32", 256)}) == 3


def test_fingerprint_changes_with_the_mlx_and_mlx_lm_that_compute_the_kv(tmp_path):
    """Their kernels round differently from one version to the next: KV an older mlx-lm
    computed must be a miss after an upgrade, not reused (nor shared across a team)."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    installed = runtime()
    assert set(installed) == {"mlx", "mlx_lm", "device", "blas"}
    base = model_fingerprint(tmp_path, "float32", 256)
    assert base == model_fingerprint(tmp_path, "float32", 256, computed_by=installed)
    others = [model_fingerprint(tmp_path, "float32", 256, computed_by=dict(installed, **change))
              for change in ({"mlx": "0.0.1"}, {"mlx_lm": "0.0.1"}, {"device": "gpu"}, {"blas": "other"})]
    assert len({base, *others}) == 5
    assert len({root_key(fp) for fp in (base, *others)}) == 5  # so every block key differs


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512 * 10**6), ("4GiB", 4 * 2**30), ("1.5g", 1_500_000_000), ("123", 123), (" 2 kib ", 2048)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12 parsecs", "-5MB", "GB"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_the_blas_behind_cpu_matmuls_is_named():
    """OpenBLAS (preloaded for the tests, as the daemon preloads it) rounds differently from
    the BLAS mlx ships with: the fingerprint must tell the two apart."""
    name = blas_library()
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    assert name.startswith("OpenBLAS") if preloaded else name == "builtin"

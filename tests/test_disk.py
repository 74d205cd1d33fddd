"""Block files: the zero-copy reader against the safetensors package, and damaged input."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kvtier.disk import TOKENS_TENSOR, BlockFiles, DamagedBlock, checksum, encode_block, parse_block


def sample_block() -> bytes:
    arrays = {"0.keys.0": mx.random.normal((1, 2, 5, 8)),
              "0.values.0": mx.random.normal((1, 2, 5, 8)).astype(mx.bfloat16),
              "1.keys.0": mx.random.randint(0, 2**31, (1, 2, 5, 4)).astype(mx.uint32)}
    return encode_block(arrays, np.arange(5, dtype=np.uint32), {"kind": "kv"})


def test_reader_sees_exactly_what_safetensors_wrote():
    payload = sample_block()
    parsed = parse_block(payload)
    reference = st_load(payload)
    assert set(parsed.tensors) | {TOKENS_TENSOR} == set(reference)
    for name, array in parsed.tensors.items():
        assert array.dtype == reference[name].dtype and np.array_equal(array, reference[name])
    assert parsed.tokens.tolist() == [0, 1, 2, 3, 4]
    assert parsed.dtypes["0.values.0"] == "bfloat16" and parsed.metadata["kind"] == "kv"


def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("spec", [
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]},  # past the end of the file
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},  # size differs from the shape
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
    {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]},
    {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
])
def test_inconsistent_headers_are_damaged_blocks(spec):
    tokens = {"dtype": "U32", "shape": [1], "data_offsets": [16, 20]}
    payload = with_header({"t": spec, TOKENS_TENSOR: tokens, "__metadata__": {"dtypes": '{"t": "float32"}'}},
                          bytes(20))
    with pytest.raises(DamagedBlock):
        parse_block(payload)


def test_metadata_dtypes_that_are_no_string_are_a_damaged_block(tmp_path):
    """A header whose `dtypes` metadata is a number, not JSON text: DamagedBlock on both reads."""
    tensors = {"t": {"dtype": "F32", "shape": [1, 1, 1, 1], "data_offsets": [0, 4]},
               TOKENS_TENSOR: {"dtype": "U32", "shape": [1], "data_offsets": [4, 8]}}
    payload = with_header(dict(tensors, __metadata__={"dtypes": 5}), bytes(8))
    with pytest.raises(DamagedBlock):
        parse_block(payload)
    files = BlockFiles(tmp_path / "blocks")
    files.write("cd" * 16, payload)
    with pytest.raises(DamagedBlock):
        files.read_into("cd" * 16, checksum(payload), len(payload), {"t": np.zeros((1, 1, 1, 1), np.float32)})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_parses_or_is_a_damaged_block(data):
    """Whatever bytes a file holds, reading it gives a block or DamagedBlock, nothing else."""
    payload = bytearray(sample_block())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = bytes(payload[: data.draw(st.integers(0, len(payload)))])
    try:
        parsed = parse_block(cut)
    except DamagedBlock:
        return
    for array in parsed.tensors.values():
        assert array.nbytes <= len(cut)


def test_file_written_by_safetensors_alone_is_read():
    """The format is plain safetensors: a file from the library itself reads the same."""
    tensors = {"0.keys.0": np.ones((1, 1, 2, 2), np.float32), TOKENS_TENSOR: np.array([7, 8], np.uint32)}
    parsed = parse_block(st_save(tensors, metadata={"dtypes": '{"0.keys.0": "float32"}'}))
    assert parsed.tokens.tolist() == [7, 8] and parsed.tensors["0.keys.0"].sum() == 4


def block_file(tmp_path) -> tuple[BlockFiles, str, bytes]:
    files = BlockFiles(tmp_path / "blocks")
    payload = sample_block()
    files.write("ab" * 16, payload)
    return files, "ab" * 16, payload


def buffer_views(payload: bytes, start: int, capacity: int = 16) -> tuple[dict, dict]:
    """Zeroed buffers of `capacity` tokens shaped like the sample block's tensors, and views
    of them at tokens [start, start + 5): where `read_into` writes."""
    tensors = parse_block(payload).tensors
    buffers = {name: np.zeros(t.shape[:2] + (capacity,) + t.shape[3:], t.dtype) for name, t in tensors.items()}
    return buffers, {name: b[:, :, start:start + 5] for name, b in buffers.items()}


def test_read_into_lands_every_tensor_at_its_place_in_strided_buffers(tmp_path):
    files, key, payload = block_file(tmp_path)
    buffers, targets = buffer_views(payload, start=3)
    parsed = files.read_into(key, checksum(payload), len(payload), targets)
    reference = st_load(payload)
    assert parsed.in_place and parsed.tokens.tolist() == [0, 1, 2, 3, 4]
    for name, buffer in buffers.items():
        assert np.array_equal(buffer[:, :, 3:8], reference[name])
        assert not buffer[:, :, :3].any() and not buffer[:, :, 8:].any()  # nothing written around it
    assert parsed.dtypes["0.values.0"] == "bfloat16"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_read_into_any_changed_byte_or_length_is_a_damaged_block(tmp_path_factory, data):
    """Read straight into buffers, a file is checked as a whole file read is: any byte
    changed, or the file cut short, is DamagedBlock (the checksum over where the bytes
    landed), never a block."""
    files, key, payload = block_file(tmp_path_factory.mktemp("read_into"))
    damaged = bytearray(payload)
    position = data.draw(st.integers(0, len(payload) - 1))
    damaged[position] ^= data.draw(st.integers(1, 255))
    damaged = damaged[: data.draw(st.sampled_from([len(payload), position + 1, len(payload) // 2]))]
    files.path_for(key).write_bytes(bytes(damaged))
    _, targets = buffer_views(payload, start=0)
    with pytest.raises(DamagedBlock):
        files.read_into(key, checksum(payload), len(damaged), targets)


def test_read_into_buffers_of_another_layout_is_a_damaged_block(tmp_path):
    files, key, payload = block_file(tmp_path)
    _, targets = buffer_views(payload, start=0)
    for wrong in ({k: v for k, v in targets.items() if k != "1.keys.0"},  # a tensor missing
                  dict(targets, **{"1.keys.0": targets["1.keys.0"].view(np.float32)}),  # another dtype
                  dict(targets, **{"0.keys.0": np.zeros((1, 2, 5, 4), np.float32)})):  # another shape
        with pytest.raises(DamagedBlock):
            files.read_into(key, checksum(payload), len(payload), wrong)

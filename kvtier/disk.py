"""Cold tier files: one safetensors file per block, named by its key, written crash-safely.

Write order: temp file, fsync, rename, fsync the directory. The index is committed only
after that (see tiers.py), so an index entry always points at a complete file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import mlx.core as mx
import numpy as np
import xxhash
from safetensors.numpy import save as st_save

if TYPE_CHECKING:  # kvstate pulls in mlx_lm (a second or more): the CLI reads the cache without it
    from .kvstate import BlockArrays

TOKENS_TENSOR = "__tokens__"


class DamagedBlock(Exception):
    """A block file that is missing, truncated, altered or not what its index says."""


def checksum(payload: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(payload)


def content_hash(tensors: dict[str, np.ndarray]) -> str:
    """xxh3-128 of every tensor's name, dtype, shape and bytes, in name order: kept in the
    file's metadata so a file can be checked without its index record (index rebuild)."""
    hasher = xxhash.xxh3_128()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        hasher.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        hasher.update(array.reshape(-1).view(np.uint8).data)  # .data: typed as a buffer, as the array is not
    return hasher.hexdigest()


def encode_block(arrays: BlockArrays, tokens: np.ndarray, meta: dict[str, str]) -> bytes:
    from .kvstate import dtype_name, host_view  # only writers encode: they have the model loaded

    tensors = {TOKENS_TENSOR: np.asarray(tokens, dtype=np.uint32)}
    dtypes = {}
    for name, array in arrays.items():
        # numpy has no bfloat16: such arrays are stored bit-for-bit as uint16, and the real
        # dtype is kept in the file's metadata.
        dtypes[name] = dtype_name(array.dtype)
        tensors[name] = np.array(host_view(array), copy=True)
    metadata = dict(meta, dtypes=json.dumps(dtypes, sort_keys=True), content=content_hash(tensors))
    return st_save(tensors, metadata=metadata)


# safetensors dtype codes -> numpy dtypes (bfloat16 never appears: stored as uint16).
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                 "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


@dataclass
class ParsedBlock:
    """A block file parsed into numpy views over its bytes (no copy): safe to build off the
    MLX thread, and copied only once, straight into the prompt cache being rebuilt."""

    tensors: dict[str, np.ndarray]
    tokens: np.ndarray
    metadata: dict[str, str]
    dtypes: dict[str, str]  # the real dtype of each tensor (bfloat16 is stored as uint16)
    in_place: bool = False  # its tensors are views of a prompt's buffers, read straight into them

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def parse_block(payload: bytes) -> ParsedBlock:
    try:
        header_len = _header_length(payload, len(payload))
        specs, metadata = _tensor_specs(payload[8 : 8 + header_len], len(payload) - 8 - header_len)
        tensors = {name: np.frombuffer(payload, dtype, math.prod(shape), 8 + header_len + begin).reshape(shape)
                   for name, (dtype, shape, begin, _) in specs.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedBlock(f"unreadable block file: {exc}") from exc
    return _parsed(tensors, metadata)


def _parsed(tensors: dict[str, np.ndarray], metadata: dict[str, str], in_place: bool = False) -> ParsedBlock:
    try:
        dtypes = json.loads(metadata.get("dtypes", "{}"))
    except (ValueError, TypeError) as exc:  # TypeError: a header's metadata value that is no string
        raise DamagedBlock(f"unreadable block file: {exc}") from exc
    tokens = tensors.pop(TOKENS_TENSOR, None)
    if tokens is None or not isinstance(dtypes, dict) or set(dtypes) != set(tensors):
        raise DamagedBlock("block file lacks its tokens or dtypes")
    return ParsedBlock(tensors, tokens, metadata, dtypes, in_place)


# One tensor of a block file: its dtype, shape and data offsets (from the data's start).
TensorSpec = tuple[np.dtype, tuple[int, ...], int, int]


def _header_length(head: bytes, file_size: int) -> int:
    header_len = int.from_bytes(head[:8], "little")
    if file_size < 8 or header_len > file_size - 8:
        raise ValueError("truncated header")
    return header_len


def _tensor_specs(header_json: bytes, data_size: int) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The safetensors layout: an 8-byte header length, a JSON header of dtype/shape/offsets
    per tensor, then the data. Every offset and size is checked against the data's size."""
    header = json.loads(header_json)
    specs = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_NUMPY_DTYPES[spec["dtype"]])
        shape, (begin, end) = _naturals(spec["shape"]), _naturals(spec["data_offsets"])
        if not begin <= end <= data_size or end - begin != dtype.itemsize * math.prod(shape):
            raise ValueError(f"tensor {name!r} lies outside the file or has the wrong size")
        specs[name] = (dtype, shape, begin, end)
    return specs, dict(header.get("__metadata__") or {})


def _naturals(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(n) is int and n >= 0 for n in value):
        raise ValueError(f"expected a list of non-negative integers, got {value!r}")
    return tuple(value)


def to_mlx(parsed: ParsedBlock) -> BlockArrays:
    arrays = {}
    for name, value in parsed.tensors.items():
        array = mx.array(value)
        target = getattr(mx, parsed.dtypes[name], None)
        if not isinstance(target, mx.Dtype):
            raise DamagedBlock(f"unknown dtype {parsed.dtypes[name]!r}")
        arrays[name] = array.view(target) if array.dtype != target else array
    return arrays


def decode_block(payload: bytes) -> tuple[BlockArrays, np.ndarray, dict[str, str]]:
    parsed = parse_block(payload)
    return to_mlx(parsed), parsed.tokens, parsed.metadata


@dataclass
class Written:
    nbytes: int  # the file's size
    allocated: int  # what the filesystem allocates for it (st_blocks * 512)


@dataclass
class BlockFiles:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir_bytes: dict[str, int] | None = None  # allocated size of root and its subdirectories

    def path_for(self, key_hex: str) -> Path:
        return self.root / key_hex[:2] / f"{key_hex}.safetensors"

    def write(self, key_hex: str, payload: bytes) -> Written:
        """Write a block durably; returns its size and what it occupies. A missing block
        directory (removed under a running daemon) is made again."""
        path = self.path_for(key_hex)
        self._make_dirs(path.parent)
        tmp = path.parent / f".{key_hex}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
                allocated = os.fstat(f.fileno()).st_blocks * 512
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)  # on a read-only or vanished directory this fails too
            raise
        _fsync_dir(path.parent)
        self._note_dir(path.parent)
        return Written(len(payload), allocated)

    def _make_dirs(self, subdir: Path) -> None:
        for directory in (self.root, subdir):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue
            if directory == self.root:
                self._dir_bytes = None  # it was gone, and its subdirectories with it

    def _note_dir(self, subdir: Path) -> None:
        """Directories grow with their entries: keep their allocated size current."""
        self._dir_sizes()[subdir.name] = allocated_bytes(subdir)

    def dir_bytes(self) -> int:
        """What the block directories themselves occupy (a listing of the root only)."""
        return sum(tuple(self._dir_sizes().values()))

    def _dir_sizes(self) -> dict[str, int]:
        sizes = self._dir_bytes
        if sizes is None:
            sizes = {"": allocated_bytes(self.root)}
            try:
                with os.scandir(self.root) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            sizes[entry.name] = entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
            self._dir_bytes = sizes
        return sizes

    def free_space(self) -> tuple[int, int]:
        """(bytes free to us, total bytes) of the filesystem holding the block files."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        stat = os.statvfs(path)
        return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize

    def probe(self) -> None:
        """Create, sync and remove a small file: raises the OSError a block write would meet."""
        self._make_dirs(self.root)
        tmp = self.root / f".probe.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"kvtier")
            os.fsync(fd)
        finally:
            os.close(fd)
            tmp.unlink()

    def read(self, key_hex: str, expected_checksum: str, expected_size: int) -> bytes:
        path = self.path_for(key_hex)
        try:
            if path.stat().st_size != expected_size:
                raise DamagedBlock(f"{path.name}: size differs from the index")
            payload = path.read_bytes()
        except OSError as exc:
            raise DamagedBlock(f"{path.name}: {exc.strerror}") from exc
        if checksum(payload) != expected_checksum:
            raise DamagedBlock(f"{path.name}: checksum mismatch")
        return payload

    def read_into(self, key_hex: str, expected_checksum: str, expected_size: int,
                  targets: dict[str, np.ndarray]) -> ParsedBlock:
        """A block file read straight into `targets` (a view per tensor name, e.g. a prompt's
        buffers at the block's tokens): no intermediate copy, and the checksum taken over
        the bytes where they landed. DamagedBlock when it is not the file the index says,
        or does not fit `targets` exactly; what was written into them is then meaningless."""
        path = self.path_for(key_hex)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise DamagedBlock(f"{path.name}: {exc.strerror}") from exc
        try:
            if os.fstat(fd).st_size != expected_size:
                raise DamagedBlock(f"{path.name}: size differs from the index")
            tensors, metadata = _read_tensors_into(fd, expected_size, targets, expected_checksum)
        except OSError as exc:
            raise DamagedBlock(f"{path.name}: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedBlock(f"{path.name}: unreadable block file: {exc}") from exc
        finally:
            os.close(fd)
        return _parsed(tensors, metadata, in_place=True)

    def will_need(self, key_hexes: list[str]) -> None:
        """Ask the kernel to start reading these files into the page cache (no wait), so the
        disk works while the reader waits for its buffers. Where there is no such call
        (macOS), nothing."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key_hex in key_hexes:
            try:
                fd = os.open(self.path_for(key_hex), os.O_RDONLY)
            except OSError:
                continue  # its read finds out
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def remove(self, key_hex: str) -> None:
        remove_path(self.path_for(key_hex))

    def prune_dir(self, key_hex: str) -> None:
        """Remove the key's subdirectory if it is empty now: an empty directory still takes
        a block of the budget. Only the writer may call this (it recreates what it needs)."""
        subdir = self.path_for(key_hex).parent
        try:
            subdir.rmdir()
        except OSError:  # not empty (or gone, or read-only): nothing to do
            return
        if self._dir_bytes is not None:
            self._dir_bytes.pop(subdir.name, None)

    def subdirs(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []

    def iter_files(self) -> Iterator[Path]:
        """Every file under the block root, temp leftovers included."""
        for sub in self.subdirs():
            yield from sorted(sub.iterdir())


HEAD_READ = 4096  # a block file's header is a few hundred bytes per layer: one read mostly


def _read_tensors_into(fd: int, size: int, targets: dict[str, np.ndarray], expected_checksum: str
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the header, check the tensors tile the data and match `targets` in dtype and
    shape, then read the data with one scatter read into them (and the tokens into an array
    of their own), hashing it in file order: the file's checksum without the file in memory."""
    head = os.pread(fd, min(size, HEAD_READ), 0)
    header_len = _header_length(head, size)
    if 8 + header_len > len(head):
        head += os.pread(fd, 8 + header_len - len(head), len(head))
    head = head[: 8 + header_len]
    specs, metadata = _tensor_specs(head[8:], size - len(head))
    if set(specs) != {*targets, TOKENS_TENSOR}:
        raise DamagedBlock("tensors differ from this model's layout")
    tensors, pieces, cursor = {}, [], 0
    for name, (dtype, shape, begin, end) in sorted(specs.items(), key=lambda kv: kv[1][2]):
        target = targets.get(name) if name != TOKENS_TENSOR else np.empty(shape, dtype)
        if begin != cursor or target is None or target.dtype != dtype or target.shape != shape:
            raise DamagedBlock(f"tensor {name!r} is not where or what this model's layout says")
        tensors[name], cursor = target, end
        pieces += _contiguous_pieces(target)
    if cursor != size - len(head):
        raise DamagedBlock("the file's data is not exactly its tensors")
    _preadv_exactly(fd, pieces, len(head))
    hasher = xxhash.xxh3_128(head)
    for piece in pieces:
        hasher.update(piece)
    if hasher.hexdigest() != expected_checksum:
        raise DamagedBlock("checksum mismatch")
    return tensors, metadata


def _contiguous_pieces(array: np.ndarray) -> list[memoryview]:
    """Byte views of an array's memory in C order, as few as its strides allow (a block's
    slice of a buffer: one run per head)."""
    if array.flags.c_contiguous:
        return [array.reshape(-1).view(np.uint8).data] if array.size else []
    return [piece for part in array for piece in _contiguous_pieces(part)]


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _preadv_exactly(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Fill every piece from the file at `offset` on, in order (preadv may read less)."""
    pending = [p for p in pieces if len(p)]
    while pending:
        n = os.preadv(fd, pending[:IOV_MAX], offset)
        if n == 0:
            raise DamagedBlock("file ends before its tensors do")
        offset += n
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending.pop(0))
            else:
                pending[0], n = pending[0][n:], 0


# The names kvtier gives what it writes under the block root: block files, and the temp
# files of a write or a probe in flight (BlockFiles.write, .probe).
BLOCK_NAME = re.compile(r"([0-9a-f]{32})\.safetensors")
TEMP_NAME = re.compile(r"\.(?:[0-9a-f]{32}|probe)\.[0-9a-f]{8}\.tmp")
SUBDIR_NAME = re.compile(r"[0-9a-f]{2}")


def key_of_path(path: Path) -> str | None:
    """The block key a block file's name carries; None for any other name."""
    match = BLOCK_NAME.fullmatch(path.name)
    return match.group(1) if match else None


def is_temp_name(name: str) -> bool:
    return TEMP_NAME.fullmatch(name) is not None


def remove_path(path: Path) -> None:
    """Remove a file, or a directory standing in a block file's place (made by hand or by a
    tool: it holds no block of ours); nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def allocated_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

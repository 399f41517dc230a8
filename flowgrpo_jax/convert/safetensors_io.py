"""Reads and writes safetensors files one tensor (or one slice of one) at a time, without torch.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range within the data section, then the raw bytes. Doing it ourselves gives
bfloat16 through ml_dtypes (safetensors' NumPy loader has none), checks every header entry
before any tensor is read (so a bad offset names its tensor instead of reading the wrong
bytes), and reads with positioned reads of bounded size instead of memory maps, so a loader's
memory holds its result and one small buffer, not the file's pages.
"""
import json
import math
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(t): name for name, t in _DTYPES.items()}
# Preferred weight file names, diffusers' then transformers'; fp16 variants only if alone.
_STANDARD_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# The most bytes one read brings into memory; rows larger than this are read row by row.
READ_CHUNK_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A weight file or folder that cannot be read as the checkpoint it claims to be."""


def read_header(path: str) -> tuple[dict, int]:
    """Returns ({name: {dtype, shape, data_offsets}}, offset where tensor data begins).

    Every entry is checked (known dtype, shape of non-negative ints, offsets inside the data
    section whose length fits the shape, no two tensors overlapping) before it is returned.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header says {header_len} bytes, "
                f"file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                              f"not an object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, info in header.items():
        _check_entry(path, name, info, data_start, size)
    _check_no_overlap(path, header)
    return header, data_start


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: str, name: str, info, data_start: int, size: int) -> None:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is a JSON {type(info).__name__}, "
                              f"not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise CheckpointError(f"{where}: header entry has no {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair of "
                              f"integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets {offsets} do not satisfy 0 <= begin <= end")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where} of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
                              f"header gives {end - begin}")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte "
                              f"{data_start + end}, file has {size}")


def _check_no_overlap(path: str, header: dict) -> None:
    ranges = sorted((*info["data_offsets"], name) for name, info in header.items()
                    if info["data_offsets"][0] < info["data_offsets"][1])
    for (_, end, name), (begin, next_end, next_name) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {name!r} (data bytes ..{end}) and "
                                  f"{next_name!r} ({begin}..{next_end}) overlap")


def read_tensor(path: str, info: dict, data_start: int, index=None, dtype=None) -> np.ndarray:
    """Reads `tensor[index]` of a checked header entry, cast to `dtype` (default: stored).

    `index` is a tuple of slices with positive steps, one per leading dim (as jax's shard
    callbacks pass it; None: the whole tensor). Only the rows the slice spans are read, at most
    READ_CHUNK_BYTES at a time, and nothing is memory-mapped.
    """
    stored = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    index = tuple(index or ())
    ranges = [range(*s.indices(n)) for s, n in zip(index + (slice(None),) * len(shape), shape)]
    if any(r.step < 0 for r in ranges):
        raise ValueError(f"{path}: reading {index} with a negative step is not supported")
    out = np.empty(tuple(len(r) for r in ranges), dtype or stored)
    with open(path, "rb") as f:
        _read_into(out, _Reader(path, f.fileno(), stored), data_start + info["data_offsets"][0],
                   shape, ranges)
    return out


class _Reader:
    def __init__(self, path: str, fd: int, dtype: np.dtype):
        self.path, self.fd, self.dtype = path, fd, dtype

    def read(self, offset: int, count: int) -> np.ndarray:
        """`count` stored elements starting at byte `offset`."""
        nbytes = count * self.dtype.itemsize
        data = os.pread(self.fd, nbytes, offset)
        if len(data) != nbytes:
            raise CheckpointError(f"{self.path}: truncated file: {nbytes} bytes wanted at byte "
                                  f"{offset}, got {len(data)}")
        return np.frombuffer(data, self.dtype)


def _read_into(out: np.ndarray, reader: _Reader, offset: int, shape: tuple, ranges: list) -> None:
    """Fills `out` with the elements at `ranges` of the row-major tensor of `shape` at `offset`."""
    if not shape:
        out[...] = reader.read(offset, 1).reshape(())
        return
    rows, inner = ranges[0], tuple(slice(r.start, r.stop, r.step) for r in ranges[1:])
    row_items = math.prod(shape[1:])
    row_bytes = row_items * reader.dtype.itemsize
    if row_bytes > READ_CHUNK_BYTES:
        for k, row in enumerate(rows):
            _read_into(out[k], reader, offset + row * row_bytes, shape[1:], ranges[1:])
        return
    rows_per_read = max(1, READ_CHUNK_BYTES // max(row_bytes * rows.step, 1))
    for k in range(0, len(rows), rows_per_read):
        part = rows[k:k + rows_per_read]
        span = part[-1] - part[0] + 1
        block = reader.read(offset + part[0] * row_bytes, span * row_items)
        block = block.reshape(span, *shape[1:])
        out[k:k + len(part)] = block[(slice(None, None, rows.step),) + inner]


def stored_dtype(info: dict) -> np.dtype:
    """The numpy dtype of a checked header entry."""
    return np.dtype(_DTYPES[info["dtype"]])


def read_metadata(path: str) -> dict:
    """The header's `__metadata__` (a str -> str dict; empty when there is none)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        try:
            header = json.loads(f.read(struct.unpack("<Q", raw)[0]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def _nbytes(value) -> int:
    return math.prod(tuple(value.shape)) * np.dtype(value.dtype).itemsize


def write_safetensors(path: str, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """Writes {name: array} as a safetensors file, one tensor in memory at a time.

    A value may be lazy: anything with `shape` and `dtype` that np.asarray materialises. The
    header is written first from the shapes and dtypes alone, then each value is materialised,
    written and dropped. `metadata` (str -> str) goes into the header's `__metadata__`.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, value in tensors.items():
        dtype, shape = np.dtype(value.dtype), tuple(value.shape)
        if dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors "
                             f"cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, value in tensors.items():
            array = np.asarray(value)
            entry = header[name]
            if list(array.shape) != entry["shape"] or _NAMES.get(array.dtype) != entry["dtype"]:
                raise ValueError(f"{path}: tensor {name!r} materialised as {array.dtype} "
                                 f"{list(array.shape)}, declared {entry['dtype']} {entry['shape']}")
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            del array  # before the next one is materialised


def write_sharded(folder: str, stem: str, tensors: Mapping, max_shard_bytes: int,
                  metadata: Mapping[str, str] | None = None) -> list[str]:
    """Writes {name: array} into `folder` as transformers / diffusers save them: `stem`.safetensors
    when it fits in `max_shard_bytes`, else `stem`-0000i-of-0000n.safetensors shards of at most
    that size (a larger tensor alone in its own) with `stem`.safetensors.index.json mapping
    each tensor to its shard. Values may be lazy; one is in memory at a time. Returns the files
    written."""
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        nbytes = _nbytes(value)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += nbytes
    shards.append(current)
    os.makedirs(folder, exist_ok=True)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(folder, name), shard, metadata)
    written = [os.path.join(folder, n) for n in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(v) for v in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        path = os.path.join(folder, f"{stem}.safetensors.index.json")
        with open(path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        written.append(path)
    return written


class SafetensorsFolder(Mapping):
    """The tensors of one model folder (single file or sharded with an index), read on demand."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where = {}  # tensor name -> (file, header entry, data start)
        for file in self._weight_files(folder):
            header, start = read_header(file)
            for name, info in header.items():
                self._where[name] = (file, info, start)

    @staticmethod
    def _weight_files(folder: str) -> list[str]:
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a directory")
        names = sorted(os.listdir(folder))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        indexes = [n for n in indexes if n[: -len(".index.json")] in _STANDARD_NAMES] or indexes
        if indexes:
            with open(os.path.join(folder, indexes[0])) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise CheckpointError(f"{folder}: index {indexes[0]} lists missing shards {missing}")
            return [os.path.join(folder, s) for s in shards]
        files = [n for n in names if n.endswith(".safetensors")]
        standard = [n for n in _STANDARD_NAMES if n in files]
        if standard:
            return [os.path.join(folder, standard[0])]
        if len(files) == 1:
            return [os.path.join(folder, files[0])]
        if not files:
            other = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (f" (found {other}: re-save with save_pretrained(safe_serialization=True))"
                    if other else "")
            raise CheckpointError(f"{folder}: no .safetensors weights{hint}")
        raise CheckpointError(f"{folder}: several weight files and no index: {files}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, (_, info, _) in self._where.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {name: np.dtype(_DTYPES[info["dtype"]]) for name, (_, info, _) in self._where.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        file, info, start = self._where[name]
        return read_tensor(file, info, start)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

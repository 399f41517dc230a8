"""Reads safetensors files as lazy NumPy views, without torch and without loading everything.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. Reading it ourselves gives bfloat16 through ml_dtypes
(safetensors' NumPy loader has none) and lets us name the tensor a truncated file cuts off.
"""
import json
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
# Preferred weight file names, diffusers' then transformers'; fp16 variants only if alone.
_STANDARD_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class CheckpointError(ValueError):
    """A weight file or folder that cannot be read as the checkpoint it claims to be."""


def read_header(path: str) -> tuple[dict, int]:
    """Returns ({name: {dtype, shape, data_offsets}}, offset where tensor data begins)."""
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
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {info['shape']} needs {nbytes} bytes, "
                f"header gives {end - begin}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
                f"file has {size}")
    return header, data_start


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

    def __getitem__(self, name: str) -> np.ndarray:
        file, info, start = self._where[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if end == begin:
            return np.zeros(info["shape"], dtype)
        flat = np.memmap(file, dtype=dtype, mode="r", offset=start + begin,
                         shape=((end - begin) // dtype.itemsize,))
        return flat.reshape(info["shape"])

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

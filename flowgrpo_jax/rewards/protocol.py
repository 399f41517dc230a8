"""Wire format of the reward server: a batch of uint8 images with prompts, never pickle.

A `POST /score` body is

    4 bytes   big-endian uint32: length L of the JSON header
    L bytes   UTF-8 JSON header: {"batch_id": str, "prompts": [str, ...],
              "metadata": [object, ...], "dtype": "uint8", "shape": [N, H, W, 3]}
    rest      the N*H*W*3 image bytes, C order (NHWC)

Both sides use these functions, so the format lives in one place.
"""

import json
import re
import struct

import numpy as np

CONTENT_TYPE = "application/x-flowgrpo-images"
_HEADER_LEN = struct.Struct(">I")
_BATCH_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ProtocolError(ValueError):
    """A request that breaks the wire format; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_batch_id(batch_id) -> str:
    if not isinstance(batch_id, str) or not _BATCH_ID.match(batch_id):
        raise ProtocolError(
            f"batch_id must be 1-128 characters from [A-Za-z0-9_.-], got {batch_id!r}")
    return batch_id


def encode_request(batch_id: str, images: np.ndarray, prompts, metadata=None) -> bytes:
    """Packs one batch; checks it the way the server will, so mistakes fail early and locally."""
    images = np.asarray(images)
    prompts = list(prompts)
    metadata = [{} for _ in prompts] if metadata is None else list(metadata)
    header = {
        "batch_id": check_batch_id(batch_id),
        "prompts": prompts,
        "metadata": metadata,
        "dtype": str(images.dtype),
        "shape": list(images.shape),
    }
    _check_header(header)
    header_bytes = json.dumps(header).encode("utf-8")
    return _HEADER_LEN.pack(len(header_bytes)) + header_bytes + np.ascontiguousarray(images).tobytes()


def decode_request(body: bytes | bytearray):
    """Returns (batch_id, images (N, H, W, 3) uint8, prompts, metadata); raises ProtocolError."""
    if len(body) < _HEADER_LEN.size:
        raise ProtocolError(f"body of {len(body)} bytes is too short to hold the header length")
    (header_len,) = _HEADER_LEN.unpack_from(body)
    if header_len > len(body) - _HEADER_LEN.size:
        raise ProtocolError(
            f"header length {header_len} exceeds the {len(body) - _HEADER_LEN.size} bytes sent")
    raw_header = body[_HEADER_LEN.size:_HEADER_LEN.size + header_len]
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    header.setdefault("metadata", [{} for _ in header.get("prompts") or []])
    _check_header(header)
    payload = memoryview(body)[_HEADER_LEN.size + header_len:]
    shape = tuple(header["shape"])
    expected = int(np.prod(shape))
    if len(payload) != expected:
        raise ProtocolError(
            f"shape {list(shape)} needs {expected} image bytes, the body carries {len(payload)}")
    images = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
    return header["batch_id"], images, header["prompts"], header["metadata"]


def _check_header(header: dict) -> None:
    missing = [k for k in ("batch_id", "prompts", "dtype", "shape") if k not in header]
    if missing:
        raise ProtocolError(f"header lacks {missing}")
    check_batch_id(header["batch_id"])
    if header["dtype"] != "uint8":
        raise ProtocolError(f"images must be uint8, got dtype {header['dtype']!r}")
    shape = header["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ProtocolError(f"shape must be a list of positive integers, got {shape!r}")
    if len(shape) != 4 or shape[3] != 3:
        raise ProtocolError(f"images must be (N, H, W, 3) RGB, got shape {shape}")
    prompts, metadata = header["prompts"], header["metadata"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("prompts must be a list of strings")
    if shape[0] != len(prompts):
        raise ProtocolError(f"{shape[0]} images but {len(prompts)} prompts")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError("metadata must be a list of JSON objects, one per image")
    if len(metadata) != len(prompts):
        raise ProtocolError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")

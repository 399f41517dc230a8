"""Wire format of the reward server: a batch of uint8 images with prompts, never pickle.

A `POST /score` body is

    4 bytes   big-endian uint32: length L of the JSON header (at most MAX_HEADER_BYTES)
    L bytes   UTF-8 JSON header: {"batch_id": str, "prompts": [str, ...],
              "metadata": [object, ...], "dtype": "uint8", "shape": [N, H, W, 3]}
    rest      the N*H*W*3 image bytes, C order (NHWC)

and its answer is the JSON object of `encode_result`. Both sides use these functions, so the
format lives in one place. Sizes are computed with Python integers, which cannot overflow.
"""

import json
import math
import re
import struct

import numpy as np

CONTENT_TYPE = "application/x-flowgrpo-images"
TOKEN_ENV = "FLOWGRPO_REWARD_TOKEN"  # the shared secret, when it is not on the command line
MAX_HEADER_BYTES = 16 * 2**20  # a batch's prompts and metadata need far less
_HEADER_LEN = struct.Struct(">I")
_BATCH_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_LISTED_IMAGES = 10  # image indices named in a non-finite-scores error


class ProtocolError(ValueError):
    """A request that breaks the wire format; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def authorization(token: str) -> str:
    """The Authorization header value that carries the shared secret."""
    return f"Bearer {token}"


def check_batch_id(batch_id) -> str:
    if not isinstance(batch_id, str) or not _BATCH_ID.fullmatch(batch_id):
        raise ProtocolError(
            f"batch_id must be 1-128 characters from [A-Za-z0-9_.-], got {describe(batch_id)}")
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
    try:
        header_bytes = json.dumps(header, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"prompts and metadata must be plain JSON: {e}") from None
    _check_header_length(len(header_bytes))
    return _HEADER_LEN.pack(len(header_bytes)) + header_bytes + np.ascontiguousarray(images).tobytes()


def decode_request(body: bytes | bytearray):
    """Returns (batch_id, images (N, H, W, 3) uint8, prompts, metadata); raises ProtocolError.

    The images are a view of `body`, so a bytearray body gives writable arrays."""
    if len(body) < _HEADER_LEN.size:
        raise ProtocolError(f"body of {len(body)} bytes is too short to hold the header length")
    (header_len,) = _HEADER_LEN.unpack_from(body)
    _check_header_length(header_len)
    if header_len > len(body) - _HEADER_LEN.size:
        raise ProtocolError(
            f"header length {header_len} exceeds the {len(body) - _HEADER_LEN.size} bytes sent")
    header = _parse_header(bytes(body[_HEADER_LEN.size:_HEADER_LEN.size + header_len]))
    if isinstance(header.get("prompts"), list):
        header.setdefault("metadata", [{} for _ in header["prompts"]])
    _check_header(header)
    payload = memoryview(body)[_HEADER_LEN.size + header_len:]
    shape = tuple(header["shape"])
    expected = math.prod(shape)
    if len(payload) != expected:
        raise ProtocolError(
            f"shape {list(shape)} needs {expected} image bytes, the body carries {len(payload)}")
    images = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
    return header["batch_id"], images, header["prompts"], header["metadata"]


def encode_result(batch_id: str, total, components: dict, seconds: float) -> dict:
    """The JSON answer for a scored batch. A NaN or infinite score becomes null, which JSON
    can carry, and `error` names the components that gave one, so the client can refuse it."""
    total = np.asarray(total, np.float64)
    components = {name: np.asarray(value, np.float64) for name, value in components.items()}
    result = {
        "batch_id": batch_id,
        "total": _finite_or_null(total),
        "components": {name: _finite_or_null(value) for name, value in components.items()},
        "seconds": seconds,
    }
    checked = [*components.items(), ("total", total)]
    faults = [fault for fault in (_non_finite(name, value) for name, value in checked) if fault]
    if faults:
        result["error"] = "non-finite scores (NaN or inf, sent as null): " + "; ".join(faults)
    return result


def decode_result(payload) -> tuple:
    """The client's side of encode_result: (total, {name: scores}) as float64 arrays. Raises
    ProtocolError for an answer that carries an error, a null score or a malformed field."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"answer must be a JSON object, got {describe(payload)}")
    if payload.get("error"):
        raise ProtocolError(str(payload["error"]))
    try:
        total = np.asarray(payload["total"], np.float64)
        components = {name: np.asarray(v, np.float64) for name, v in payload["components"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"malformed answer: {type(e).__name__}: {e}") from None
    if not all(np.isfinite(v).all() for v in (total, *components.values())):
        raise ProtocolError("answer holds null or non-finite scores without naming an error")
    return total, components


def describe(value, limit: int = 60) -> str:
    """A short, safe rendering of a decoded JSON value for an error message: the repr of a
    scalar (cut to `limit` characters), the type name of anything else (which may nest deep)."""
    if isinstance(value, int) and abs(value) >= 10**limit:
        return "a huge integer"
    if isinstance(value, (str, int, float)) or value is None:
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise ProtocolError(f"header is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("header nests deeper than the JSON decoder allows") from None
    except ValueError as e:  # JSONDecodeError, an integer of too many digits, NaN/Infinity
        raise ProtocolError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {describe(header)}")
    return header


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_header_length(length: int) -> None:
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {length} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")


def _check_header(header: dict) -> None:
    missing = [k for k in ("batch_id", "prompts", "dtype", "shape") if k not in header]
    if missing:
        raise ProtocolError(f"header lacks {missing}")
    check_batch_id(header["batch_id"])
    if header["dtype"] != "uint8":
        raise ProtocolError(f"images must be uint8, got dtype {describe(header['dtype'])}")
    shape = header["shape"]
    if not isinstance(shape, list) or not all(_is_positive_int(d) for d in shape):
        raise ProtocolError(f"shape must be a list of positive integers, got {describe(shape)}")
    if len(shape) != 4 or shape[3] != 3:
        raise ProtocolError(f"images must be (N, H, W, 3) RGB, got a shape of {len(shape)} "
                            f"dimensions ending in {describe(shape[-1]) if shape else 'nothing'}")
    prompts, metadata = header["prompts"], header.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError(f"prompts must be a list of strings, got {describe(prompts)}")
    if shape[0] != len(prompts):
        raise ProtocolError(f"{describe(shape[0])} images but {len(prompts)} prompts")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError("metadata must be a list of JSON objects, one per image")
    if len(metadata) != len(prompts):
        raise ProtocolError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_or_null(values: np.ndarray) -> list:
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _non_finite(name: str, values: np.ndarray) -> str:
    """'' when all finite, else the name and the first indices of the images concerned."""
    bad = np.flatnonzero(~np.isfinite(values)).tolist()
    if not bad:
        return ""
    listed = ", ".join(map(str, bad[:_LISTED_IMAGES])) + (", ..." if len(bad) > _LISTED_IMAGES else "")
    return f"{name!r} at images [{listed}]"

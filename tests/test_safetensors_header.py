"""Every safetensors header entry is checked before any tensor is read: each bad header gives
one CheckpointError line naming the file and the tensor."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from flowgrpo_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_raw(path, header, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"__metadata__": {"format": "pt"}, "a": entry(), "b": entry(offsets=(8, 16)),
        "empty": entry(shape=(0, 3), offsets=(4, 4))}


def test_a_good_header_passes(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", GOOD, np.arange(4, dtype=np.float32).tobytes())
    header, start = read_header(path)
    assert set(header) == {"a", "b", "empty"}
    np.testing.assert_array_equal(SafetensorsFolder(str(tmp_path))["b"], [2.0, 3.0])


@pytest.mark.parametrize("header, named, says", [
    ({"a": entry(offsets=(-8, 0)), "b": entry(offsets=(8, 16))}, "'a'", "0 <= begin <= end"),
    ({"a": entry(offsets=(8, 0))}, "'a'", "0 <= begin <= end"),
    ({"a": entry(shape=(3,), offsets=(0, 12)), "b": entry(offsets=(8, 16))}, "'a'", "overlap"),
    ({"a": entry(), "b": entry(offsets=(16, 24))}, "'b'", "ends at byte"),
    ([entry()], "m.safetensors", "JSON list, not an object"),
    ({"a": [0, 8]}, "'a'", "not an object"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, "'a'", "no 'dtype'"),
    ({"a": entry(dtype="F8_E4M3")}, "'a'", "unknown dtype 'F8_E4M3'"),
    ({"a": entry(dtype=["F32"])}, "'a'", "unknown dtype"),
    ({"a": entry(shape=(3,))}, "'a'", "needs 12 bytes, header gives 8"),
    ({"a": entry(shape=(2.0,))}, "'a'", "not a list of non-negative integers"),
    ({"a": entry(shape=(-2, -1))}, "'a'", "not a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, "'a'", "not a list"),
    ({"a": entry(offsets=(0, "8"))}, "'a'", "not a [begin, end] pair"),
])
def test_a_bad_header_is_one_line_naming_file_and_tensor(tmp_path, header, named, says):
    path = write_raw(tmp_path / "m.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(path), message
    assert named in message and says in message, message


def test_overlap_names_both_tensors(tmp_path):
    header = {"a": entry(), "b": entry(offsets=(16, 24)), "c": entry(shape=(4,), offsets=(8, 24))}
    path = write_raw(tmp_path / "m.safetensors", header, bytes(24))
    with pytest.raises(CheckpointError, match=r"'c'.*'b'.*overlap"):
        read_header(path)


def test_converter_reports_a_bad_header_as_one_error_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    write_raw(src / "diffusion_pytorch_model.safetensors", {"a": entry(offsets=(-8, 0))}, bytes(8))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"),
                             "--src", str(src), "--dst", str(tmp_path / "dst")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "'a'" in lines[0] and "0 <= begin" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dst").exists()

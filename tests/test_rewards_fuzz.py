"""Generated requests (hypothesis, derandomized so every run tries the same ones): the decoder
raises nothing but ProtocolError, and a live server answers each of 2,000 raw HTTP requests
with a well-formed answer and a JSON body, logs no traceback, and stays up."""

import json
import math
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowgrpo_jax.rewards.protocol import (CONTENT_TYPE, ProtocolError, decode_request,
                                           encode_request)
from test_rewards_server import PLUGIN, ROOT, request
from test_rewards_server_limits import exchange, parse_responses, port_of

REQUESTS_PER_EXAMPLE = 4
SERVER_EXAMPLES = 500  # x REQUESTS_PER_EXAMPLE requests against the live server
FUZZ = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ANSWERED_STATUSES = {200, 400, 404, 405, 409, 411, 413, 414, 415, 431, 501, 505}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
odd_shapes = st.lists(st.integers(-1, 5) | st.integers(2**31, 2**66) | st.booleans() | st.floats(),
                      max_size=6)
batch_ids = st.sampled_from(["b-1", "b-2", "x", "", "a" * 129, "abc\n", "../x"]) | st.text(max_size=12)


@st.composite
def headers(draw) -> dict:
    """A JSON header, valid before up to three of its fields are dropped or replaced."""
    n, size = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    header = {"batch_id": draw(batch_ids), "prompts": draw(st.lists(st.text(max_size=6), min_size=n, max_size=n)),
              "metadata": [{} for _ in range(n)], "dtype": "uint8", "shape": [n, size, size, 3]}
    for key in draw(st.lists(st.sampled_from(sorted(header)), unique=True, max_size=3)):
        change = draw(st.sampled_from(["drop", "any JSON", "odd shape"]))
        if change == "drop":
            del header[key]
        else:
            header[key] = draw(json_values if change == "any JSON" else odd_shapes)
    return header


def _image_bytes(header: dict) -> int:
    shape = header.get("shape")
    small = isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 100 for d in shape)
    return math.prod(shape) if small else 48


@st.composite
def bodies(draw) -> bytes:
    """Bodies of POST /score: random bytes, or a header with a declared length and image bytes
    that may be off."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=120))
    header = draw(headers())
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    declared = draw(st.sampled_from([len(raw)] * 6 + [0, len(raw) + 1, len(raw) - 1, 2**32 - 1]))
    exact = _image_bytes(header)
    payload = draw(st.sampled_from([exact] * 6 + [0, exact - 1, exact + 1]))
    return struct.pack(">I", max(declared, 0)) + raw + bytes(max(payload, 0))


@settings(FUZZ, max_examples=1000)
@given(bodies())
def test_decoder_raises_nothing_but_protocol_errors(body):
    try:
        batch_id, images, prompts, metadata = decode_request(bytearray(body))
    except ProtocolError as e:
        assert 400 <= e.status < 500 and "\n" not in str(e) and len(str(e)) < 400, str(e)
    else:
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
        assert len(prompts) == len(metadata) == len(images) and images.flags.writeable
        assert isinstance(batch_id, str)


@settings(FUZZ, max_examples=200)
@given(st.integers(1, 3), st.integers(1, 5), st.data())
def test_encoded_batches_decode_to_the_same_values(n, size, data):
    images = data.draw(st.binary(min_size=n * size * size * 3, max_size=n * size * size * 3))
    images = np.frombuffer(images, np.uint8).reshape(n, size, size, 3)
    prompts = data.draw(st.lists(st.text(max_size=20), min_size=n, max_size=n))
    metadata = data.draw(st.lists(st.dictionaries(st.text(max_size=5), json_values.filter(_finite), max_size=3),
                                  min_size=n, max_size=n))
    batch_id, got, got_prompts, got_metadata = decode_request(bytearray(encode_request("r-1", images, prompts, metadata)))
    assert batch_id == "r-1" and got_prompts == prompts and got_metadata == metadata
    np.testing.assert_array_equal(got, images)


def _finite(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


@st.composite
def raw_requests(draw) -> bytes:
    """An HTTP request, most of them close to a real one: a request line, header lines (among
    them wrong, missing and duplicate Content-Lengths) and a body, or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    method = draw(st.sampled_from([b"GET", b"POST", b"POST", b"POST", b"PUT", b"HEAD", b"OPTIONS"])
                  | st.binary(min_size=1, max_size=6))
    path = draw(st.sampled_from([b"/score"] * 3 + [b"/health", b"/stats", b"/", b"//score", b"/score?x=1", b"*"])
                | st.binary(max_size=12))
    version = draw(st.sampled_from([b" HTTP/1.1"] * 4 + [b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.x", b"", b" http/1.1"]))
    body = draw(bodies())
    length = {"exact": len(body), "short": max(len(body) - 3, 0), "long": len(body) + 50,
              "over the limit": 10**6, "huge": 10**30, "junk": "12a", "negative": -4}
    lines = [method + b" " + path + version]
    for kind in draw(st.lists(st.sampled_from(["exact"] * 4 + sorted(length)), max_size=2)):
        lines.append(b"Content-Length: " + str(length[kind]).encode())
    lines += draw(st.lists(st.sampled_from([
        b"Content-Type: " + CONTENT_TYPE.encode(), b"Content-Type: text/plain",
        b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Connection: close",
        b"Connection: keep-alive", b"Authorization: Bearer x", b"Host: x"]) | st.binary(max_size=24),
        max_size=4))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    return eol.join([*lines, b"", body])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    port_file, log = folder / "port", folder / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "flowgrpo_jax.rewards.server", "--plugin", PLUGIN, "--rewards",
             "mean_pixel", "--port", "0", "--port-file", str(port_file), "--max-request-mb", "0.05",
             "--request-deadline", "5"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    yield process, f"http://127.0.0.1:{port_file.read_text()}", log
    process.kill()
    process.wait()


def test_live_server_answers_every_generated_request(fuzz_server):
    process, url, log = fuzz_server
    port, sent = port_of(url), []

    @settings(FUZZ, max_examples=SERVER_EXAMPLES)
    @given(st.lists(raw_requests(), min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE))
    def exchange_all(requests):
        for data in requests:
            answers = parse_responses(exchange(port, data), head=data.startswith(b"HEAD "))
            assert answers or not data, f"no answer to {data[:200]!r}"
            assert {status for status, _, _ in answers} <= ANSWERED_STATUSES, (data[:200], answers)
            sent.append(data)
        assert process.poll() is None

    start = time.monotonic()
    exchange_all()
    print(f"{len(sent)} generated requests answered in {time.monotonic() - start:.1f} s")
    assert len(sent) >= 2000
    assert request(url, "GET", "/health")[1]["status"] == "ok"
    assert "Traceback" not in log.read_text()

"""The reward server and client as real processes talking HTTP on loopback."""

import concurrent.futures
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest

from flowgrpo_jax.rewards.client import RewardClient, RewardServerError
from flowgrpo_jax.rewards.protocol import CONTENT_TYPE, encode_request

PLUGIN = str(pathlib.Path(__file__).with_name("reward_plugins.py"))
ROOT = pathlib.Path(__file__).resolve().parents[1]


def images_for(seed, n, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def start_server(tmp_path, *args, name="server"):
    """Starts `python -m flowgrpo_jax.rewards.server` and returns (process, url) once it serves."""
    port_file = tmp_path / f"{name}.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "flowgrpo_jax.rewards.server", "--plugin", PLUGIN,
         "--port", "0", "--port-file", str(port_file), *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "server did not start in 60 s"
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text()}"


def stop(process):
    process.kill()
    process.wait()
    process.stderr.close()


def request(url, method, path, body=None, headers=None):
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post_score(url, body, content_type=CONTENT_TYPE):
    return request(url, "POST", "/score", body, {"Content-Type": content_type})


def done_lines(log: pathlib.Path, key: str) -> int:
    return log.read_text().splitlines().count(f"done {key}") if log.exists() else 0


def test_burst_of_concurrent_batches_comes_back_in_order():
    with RewardClient("mean_pixel:2.0", plugins=[PLUGIN], max_workers=8) as client:
        batches = [images_for(seed, n) for seed, n in enumerate([1, 3, 2, 5, 4, 1, 2, 3, 6, 2, 1, 4])]
        futures = [client.submit(b, [f"p{i}"] * len(b)) for i, b in enumerate(batches)]
        for batch, future in zip(batches, futures):
            result = future.result(timeout=60)
            expected = batch.astype(np.float64).mean(axis=(1, 2, 3)) / 255
            np.testing.assert_allclose(result.components["mean_pixel"], expected, rtol=1e-12)
            np.testing.assert_allclose(result.components["mean_pixel/red"],
                                       batch[..., 0].mean(axis=(1, 2)) / 255, rtol=1e-12)
            np.testing.assert_allclose(result.total, 2.0 * expected, rtol=1e-12)
            assert result.components["mean_pixel/writable"].tolist() == [1.0] * len(batch)
            assert not result.cached
        assert len({f.result().batch_id for f in futures}) == len(batches)
        assert client.stats() == {"scored_batches": 12, "scored_images": 34, "cache_hits": 0}


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel", "--max-request-mb", "0.01")
    try:
        good = encode_request("ok-1", images_for(0, 2), ["a", "b"])
        bad_requests = {
            "not JSON": (b"\x00\x00\x00\x05hello", 400, "not UTF-8 JSON"),
            "short": (b"\x00\x01", 400, "too short"),
            "header overrun": (b"\x00\x00\xff\xff{}", 400, "exceeds"),
            "float32": (_header_only({"dtype": "float32"}), 400, "must be uint8, got dtype 'float32'"),
            "RGBA": (_header_only({"shape": [1, 4, 4, 4]}), 400, "(N, H, W, 3)"),
            "rank 3": (_header_only({"shape": [4, 4, 3]}), 400, "(N, H, W, 3)"),
            "count": (_header_only({"shape": [2, 4, 4, 3], "prompts": ["a"]}), 400, "2 images but 1 prompts"),
            "truncated": (good[:-5], 400, "needs 1536 image bytes"),
            "batch id": (_header_only({"batch_id": "../etc"}), 400, "batch_id"),
            "oversized": (encode_request("big", images_for(0, 8, 32), ["a"] * 8), 413, "exceeds the server's limit"),
        }
        for name, (body, status, message) in bad_requests.items():
            got_status, payload = post_score(url, body)
            assert (got_status, name) == (status, name), payload
            assert message in payload["error"], (name, payload)
            assert request(url, "GET", "/health")[1]["status"] == "ok"

        status, payload = post_score(url, good, content_type="application/python-pickle")
        assert status == 415 and "Content-Type" in payload["error"]
        assert request(url, "GET", "/nowhere")[0] == 404
        assert _raw_post_without_length(url).startswith(b"HTTP/1.1 411")
        status, payload = post_score(url, good)
        assert status == 200 and len(payload["total"]) == 2
        assert post_score(url, encode_request("ok-1", images_for(1, 2), ["a", "b"]))[0] == 409
        assert process.poll() is None
    finally:
        stop(process)


def _header_only(overrides):
    header = {"batch_id": "h", "prompts": ["a"], "dtype": "uint8", "shape": [1, 4, 4, 3], **overrides}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "big") + raw + bytes(48)


def _raw_post_without_length(url):
    port = urllib.parse.urlsplit(url).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode()
                     + b"\r\n\r\n")
        return sock.recv(4096)


def test_client_rejects_bad_batches_before_sending():
    with RewardClient("mean_pixel", plugins=[PLUGIN]) as client:
        with pytest.raises(ValueError, match="uint8"):
            client.submit(np.zeros((1, 4, 4, 3), np.float32), ["a"])
        with pytest.raises(ValueError, match="2 images but 1 prompts"):
            client.submit(images_for(0, 2), ["a"])


def test_unknown_reward_name_lists_the_registered_ones():
    run = subprocess.run([sys.executable, "-m", "flowgrpo_jax.rewards.server", "--rewards", "ocr,nope:1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown reward 'nope'" in run.stderr and "jpeg_compressibility" in run.stderr


def test_reward_that_raises_gives_a_500_and_the_server_keeps_serving():
    with RewardClient("failing", plugins=[PLUGIN]) as client:
        with pytest.raises(RewardServerError, match="HTTP 500.*this batch asked to fail"):
            client.score(images_for(0, 2), ["ok", "fail"])
        assert client.score(images_for(0, 2), ["ok", "ok"]).total.tolist() == [0.0, 0.0]


def test_server_killed_mid_request_is_restarted_and_each_batch_scored_once(tmp_path):
    log = tmp_path / "calls.log"
    with RewardClient("counted", plugins=[PLUGIN], options={"counted": {"log": log, "sleep": 0.5}},
                      max_failures=3) as client:
        first_pid = client.server_pid
        futures = [client.submit(images_for(i, 3), [f"batch-{i}"] * 3) for i in range(3)]
        deadline = time.monotonic() + 30
        while "start batch-" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(first_pid, signal.SIGKILL)  # mid-request: a batch is being scored, others wait
        for i, future in enumerate(futures):
            assert future.result(timeout=60).total.tolist() == [i, i + 1, i + 2]
        assert client.server_pid != first_pid
        assert [done_lines(log, f"batch-{i}") for i in range(3)] == [1, 1, 1]
        assert len(log.read_text().splitlines()) == 7  # the killed one started twice, finished once


def test_resent_batch_after_a_crash_is_answered_from_the_disk_cache(tmp_path):
    log, cache = tmp_path / "calls.log", tmp_path / "cache"
    args = ("--rewards", "counted", "--option", f"counted.log={log}", "--cache-dir", str(cache))
    body = encode_request("resent-7", images_for(7, 2), ["batch-7"] * 2)
    process, url = start_server(tmp_path, *args, name="first")
    status, first = post_score(url, body)
    assert status == 200 and not first["cached"]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    process, url = start_server(tmp_path, *args, name="second")
    try:
        status, again = post_score(url, body)
        assert status == 200 and again["cached"] and again["total"] == first["total"] == [7.0, 8.0]
        assert request(url, "GET", "/stats")[1] == {"scored_batches": 0, "scored_images": 0, "cache_hits": 1}
        assert done_lines(log, "batch-7") == 1
    finally:
        stop(process)


def test_resend_after_a_timeout_waits_for_the_first_copy(tmp_path):
    log = tmp_path / "calls.log"
    process, url = start_server(tmp_path, "--rewards", "counted", "--option", f"counted.log={log}",
                                "--option", "counted.sleep=2.0")
    try:
        with RewardClient(url=url, request_timeout=0.7, retry_delay=0.05, max_failures=10) as client:
            result = client.score(images_for(0, 2), ["batch-4"] * 2)
            assert result.total.tolist() == [4.0, 5.0] and result.cached
            stats = client.stats()
        assert stats["scored_batches"] == 1 and stats["cache_hits"] >= 1
        assert done_lines(log, "batch-4") == 1
    finally:
        stop(process)


def test_bounded_failures_end_in_a_clear_error(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel")
    client = RewardClient(url=url, retry_delay=0.01, max_failures=3)
    stop(process)
    try:
        with pytest.raises(RuntimeError, match="failed 3 times"):
            client.score(images_for(0, 1), ["a"])
    finally:
        client.close()
    with pytest.raises(RuntimeError, match="cannot reach the reward server"):
        RewardClient(url=url)


def test_local_server_that_cannot_start_reports_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="did not start(.|\n)*reward plugin file .* does not exist"):
        RewardClient("mean_pixel", plugins=[str(tmp_path / "missing.py")])


def test_many_concurrent_clients_against_one_server(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel")
    try:
        def one_client(seed):
            with RewardClient(url=url) as client:
                batch = images_for(seed, 2)
                return np.allclose(client.score(batch, ["a", "b"]).total,
                                   batch.astype(np.float64).mean(axis=(1, 2, 3)) / 255)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one_client, range(16)))
    finally:
        stop(process)

"""The reward server under hostile clients: memory, deadlines, connection limit, malformed
requests, non-finite scores, the token, the start-up checks and stale work folders."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

from flowgrpo_jax.rewards import workdir
from flowgrpo_jax.rewards.client import RewardClient, RewardServerError
from flowgrpo_jax.rewards.protocol import CONTENT_TYPE, encode_request
from test_rewards_server import PLUGIN, ROOT, images_for, request, start_server, stop

MB = 2**20


def port_of(url: str) -> int:
    return urllib.parse.urlsplit(url).port


def exchange(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Sends raw bytes, half-closes, and returns all the server sends until it closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may refuse and close before reading everything
            pass
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def read_until_closed(sock) -> tuple:
    """(all bytes the server sends until it closes, seconds until the first of them)."""
    start, first, chunks = time.monotonic(), None, []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks), first
        first = time.monotonic() - start if first is None else first
        chunks.append(chunk)


def parse_responses(raw: bytes, head: bool = False) -> list:
    """Splits what a server sent into (status, headers, JSON payload) answers, checking that each
    is well-formed HTTP/1.x with a JSON body (none for `head`); 1xx answers are skipped."""
    answers = []
    while raw:
        end = raw.find(b"\r\n\r\n")
        assert end >= 0, f"incomplete answer head: {raw[:300]!r}"
        status_line, *header_lines = raw[:end].decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3}) [^\r\n]*", status_line)
        assert match, f"bad status line {status_line!r}"
        status, headers, raw = int(match[1]), {}, raw[end + 4:]
        for line in header_lines:
            name, sep, value = line.partition(":")
            assert sep, f"bad header line {line!r}"
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status < 200:
            continue
        assert headers["content-type"] == ["application/json"], headers
        length = int(headers["content-length"][0])
        payload = None
        if not (head and not answers):
            body, raw = raw[:length], raw[length:]
            assert len(body) == length, f"answer body cut at {len(body)} of {length} bytes"
            payload = json.loads(body, parse_constant=_not_json)
            if status >= 400:
                assert isinstance(payload["error"], str) and "\n" not in payload["error"], payload
        answers.append((status, headers, payload))
    return answers


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


def post_bytes(body: bytes, headers: bytes = b"", length=None, target=b"/score") -> bytes:
    length = str(len(body) if length is None else length).encode()
    return (b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode()
            + b"\r\nContent-Length: " + length + b"\r\n" + headers + b"\r\n" + body)


def header_body(header_text: str, image_bytes: int = 48) -> bytes:
    raw = header_text.encode()
    return len(raw).to_bytes(4, "big") + raw + bytes(image_bytes)


def fields(**overrides) -> str:
    header = {"batch_id": "h", "prompts": ["a"], "dtype": "uint8", "shape": [1, 4, 4, 3], **overrides}
    return json.dumps(header)


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("limits"), "--rewards", "mean_pixel",
                                "--request-deadline", "10")
    yield process, port_of(url)
    stop(process)


MALFORMED = {
    "nested header": (header_body("[" * 100_000), 400, "nests deeper"),
    "5000-digit integer": (header_body(fields().replace("[1,", "[" + "9" * 5000 + ",")), 400,
                           "UTF-8 JSON"),
    "shape wrapping in int64": (header_body(fields(shape=[1, 2**32, 2**32, 3])), 400,
                                f"needs {2**64 * 3} image bytes"),
    "boolean shape": (header_body(fields(shape=[True, 4, 4, 3])), 400, "positive integers"),
    "prompts a number": (header_body(fields(prompts=5)), 400, "prompts must be a list"),
    "metadata a string": (header_body(fields(metadata="x")), 400, "metadata must be a list"),
    "batch id with a newline": (header_body(fields(batch_id="abc\n")), 400, "batch_id"),
    "NaN in the header": (header_body(fields(prompts=["a"], metadata=[{"x": float("nan")}])), 400,
                          "NaN is not JSON"),
    "header length over the limit": (b"\xff\xff\xff\xff" + bytes(8), 400, "exceeds the limit"),
    "dtype nested deep": (header_body(fields(dtype=[[[[[["u"]]]]]])), 400, "got dtype a JSON list"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_body_gets_a_json_4xx(server, name):
    process, port = server
    body, status, message = MALFORMED[name]
    [(got, _, payload)] = parse_responses(exchange(port, post_bytes(body)))
    assert (got, name) == (status, name), payload
    assert message in payload["error"], payload
    assert process.poll() is None


HTTP_LEVEL = {
    "5000-digit Content-Length": (post_bytes(b"x", length="9" * 5000), 400, "Content-Length"),
    "duplicate Content-Length": (post_bytes(b"abcd", headers=b"Content-Length: 4\r\n"), 400,
                                 "2 Content-Length headers"),
    "negative Content-Length": (post_bytes(b"", length="-1"), 400, "Content-Length"),
    "chunked": (post_bytes(b"0\r\n\r\n", headers=b"Transfer-Encoding: chunked\r\n"), 501,
                "Transfer-Encoding"),
    "no Content-Length": (b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    "unknown endpoint": (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, "no such endpoint"),
    "GET /score": (b"GET /score HTTP/1.1\r\n\r\n", 405, "POST only"),
    "POST /health": (post_bytes(b"abc", target=b"/health"), 405, "GET only"),
    "PUT": (b"PUT /score HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501, "Unsupported method"),
    "HTTP/0.9": (b"GET /health\r\n", 400, "request line"),
    "HTTP/2.0": (b"GET /health HTTP/2.0\r\n\r\n", 505, "HTTP version"),
    "blank request line": (b"\r\n", 400, "request line"),
    "request line too long": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "URI Too Long"),
    "header line too long": (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431,
                             "Line too long"),
    "too many headers": (b"GET /health HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431, "headers"),
    "body ends early": (post_bytes(b"abc", length=10), 400, "body ended after 3 of the 10 bytes"),
}


@pytest.mark.parametrize("name", HTTP_LEVEL)
def test_malformed_http_gets_a_json_answer(server, name):
    process, port = server
    data, status, message = HTTP_LEVEL[name]
    [(got, headers, payload)] = parse_responses(exchange(port, data))
    assert (got, name) == (status, name), payload
    assert message in payload["error"], payload
    if status == 405:
        assert headers["allow"] == [message.split()[0]]
    assert process.poll() is None


def test_head_gets_a_json_501_without_a_body(server):
    [(status, headers, payload)] = parse_responses(
        exchange(server[1], b"HEAD /health HTTP/1.1\r\n\r\n"), head=True)
    assert status == 501 and payload is None and int(headers["content-length"][0]) > 0


def test_keep_alive_serves_several_requests_on_one_connection(server):
    good = encode_request("keep-1", images_for(0, 1), ["a"])
    data = b"GET /health HTTP/1.1\r\n\r\n" + post_bytes(good) + b"GET /stats HTTP/1.1\r\n\r\n"
    answers = parse_responses(exchange(server[1], data))
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert answers[0][2]["max_connections"] == 32 and answers[0][2]["request_deadline_s"] == 10
    assert len(answers[1][2]["total"]) == 1


def test_claims_of_500_mb_reserve_no_memory(tmp_path):
    """16 connections each announce 500 MB and send 16 bytes: the server stays small."""
    process, url = start_server(tmp_path, "--rewards", "mean_pixel")
    sockets = []
    try:
        idle_mb = vm_rss_mb(process.pid)
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
            sock.sendall(post_bytes(bytes(16), length=500 * MB))
            sockets.append(sock)
        peak_mb = 0.0
        for _ in range(20):
            time.sleep(0.05)
            peak_mb = max(peak_mb, vm_rss_mb(process.pid))
        print(f"server RSS: {idle_mb:.0f} MB idle, {peak_mb:.0f} MB with 16 claims of 500 MB")
        assert peak_mb < 200
        assert request(url, "GET", "/health")[1]["status"] == "ok"
    finally:
        for sock in sockets:
            sock.close()
        stop(process)


def test_claim_over_the_limit_is_refused_before_the_body(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel")
    try:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(post_bytes(bytes(MB), length=600 * MB))
            answer, _ = read_until_closed(sock)
            assert time.monotonic() - start < 2
        [(status, _, payload)] = parse_responses(answer)
        assert status == 413 and "exceeds the server's limit" in payload["error"]
    finally:
        stop(process)


def _trickle(sock, data: bytes, stop_event: threading.Event) -> None:
    for i in range(len(data)):
        if stop_event.is_set():
            return
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("slow_part", ["headers", "body"])
def test_slow_sender_gets_408_at_the_deadline(tmp_path, slow_part):
    """One byte every 50 ms keeps a plain socket timeout from ever firing; the deadline does."""
    process, url = start_server(tmp_path, "--rewards", "mean_pixel", "--request-deadline", "1.5")
    stop_event = threading.Event()
    try:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
            head = post_bytes(b"", length=100_000)
            if slow_part == "body":
                sock.sendall(head)
            slow = head if slow_part == "headers" else bytes(100_000)
            thread = threading.Thread(target=_trickle, args=(sock, slow, stop_event))
            thread.start()
            answer, elapsed = read_until_closed(sock)
            stop_event.set()
            thread.join()
        [(status, _, payload)] = parse_responses(answer)
        assert status == 408 and "request not received within 1.5 s" in payload["error"]
        assert 1.4 < elapsed < 3.0, elapsed
        assert request(url, "GET", "/health")[0] == 200
    finally:
        stop(process)


def test_idle_connection_is_closed_at_the_deadline_and_scoring_is_not_limited(tmp_path):
    log = tmp_path / "calls.log"
    process, url = start_server(tmp_path, "--rewards", "counted", "--option", f"counted.log={log}",
                                "--option", "counted.sleep=1.5", "--request-deadline", "1")
    try:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
            start = time.monotonic()
            assert sock.recv(1) == b""  # closed without an answer: nothing was asked
            assert 0.9 < time.monotonic() - start < 2.5
        with RewardClient(url=url) as client:  # scoring takes longer than the deadline
            assert client.score(images_for(0, 2), ["batch-3"] * 2).total.tolist() == [3.0, 4.0]
    finally:
        stop(process)


def test_connections_beyond_the_limit_wait_their_turn(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel", "--max-connections", "2")
    port = port_of(url)
    holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(b"GET /hea")
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as waiting:
            waiting.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            with pytest.raises(TimeoutError):
                waiting.recv(1)
            holders[0].close()
            waiting.settimeout(10)
            assert waiting.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in holders:
            sock.close()
        stop(process)


NON_FINITE_PLUGIN = '''
import numpy as np
from flowgrpo_jax.rewards.registry import register

@register("non_finite")
def non_finite():
    def fn(images, prompts, metadata):
        return {"score": np.array([np.nan, 1.0, np.inf]), "fine": np.zeros(3)}
    return fn
'''


def test_non_finite_scores_are_sent_as_null_and_refused_by_the_client(tmp_path):
    plugin = tmp_path / "non_finite_plugin.py"
    plugin.write_text(NON_FINITE_PLUGIN)
    process, url = start_server(tmp_path, "--rewards", "non_finite", "--plugin", str(plugin))
    try:
        body = encode_request("nan-1", images_for(0, 3), ["a", "b", "c"])
        [(status, _, payload)] = parse_responses(exchange(port_of(url), post_bytes(body)))
        assert status == 200
        assert payload["total"] == [None, 1.0, None]
        assert payload["components"] == {"non_finite": [None, 1.0, None],
                                         "non_finite/fine": [0.0, 0.0, 0.0]}
        assert "'non_finite' at images [0, 2]" in payload["error"]
        with RewardClient(url=url) as client:
            with pytest.raises(RewardServerError) as error:
                client.score(images_for(0, 3), ["a", "b", "c"])
        message = str(error.value)
        assert "\n" not in message and "non_finite" in message
        assert re.search(r"batch [0-9a-f]{12}-0\b", message), message
    finally:
        stop(process)


def test_token_is_required_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGRPO_REWARD_TOKEN", "from-the-environment")
    process, url = start_server(tmp_path, "--rewards", "mean_pixel", "--token", "s3cret")
    try:
        port = port_of(url)
        for headers in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: s3cret\r\n",
                        b"Authorization: Bearer from-the-environment\r\n"):
            [(status, answer_headers, payload)] = parse_responses(
                exchange(port, b"GET /health HTTP/1.1\r\n" + headers + b"\r\n"))
            assert status == 401 and "token" in payload["error"]
            assert answer_headers["www-authenticate"] == ["Bearer"]
        body = encode_request("t-1", images_for(0, 1), ["a"])
        [(status, _, _)] = parse_responses(exchange(port, post_bytes(body)))
        assert status == 401
        with pytest.raises(RewardServerError, match="HTTP 401"):
            RewardClient(url=url)
        with RewardClient(url=url, token="s3cret") as client:
            assert client.score(images_for(0, 1), ["a"]).total.shape == (1,)
    finally:
        stop(process)


def test_token_from_the_environment_and_local_servers_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGRPO_REWARD_TOKEN", "env-secret")
    process, url = start_server(tmp_path, "--rewards", "mean_pixel")
    try:
        with RewardClient(url=url, token="env-secret") as client:
            assert client.health()["status"] == "ok"
        assert request(url, "GET", "/health")[0] == 401
    finally:
        stop(process)
    monkeypatch.delenv("FLOWGRPO_REWARD_TOKEN")
    with RewardClient("mean_pixel", plugins=[PLUGIN]) as client:
        assert client.health()["status"] == "ok"
        assert request(client.url, "GET", "/health")[0] == 401  # other processes are refused


def test_binding_beyond_loopback_warns(tmp_path):
    process, url = start_server(tmp_path, "--rewards", "mean_pixel", "--host", "0.0.0.0")
    try:
        assert request(url, "GET", "/health")[0] == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        log = process.stderr.read().decode()
        process.stderr.close()
    assert "listening on 0.0.0.0, beyond loopback" in log and "no --token given" in log


def test_ctrl_c_amid_connections_stops_the_server_cleanly(tmp_path):
    """SIGINT while eight clients keep connecting: exit 0, no traceback, within 10 s (a
    KeyboardInterrupt raised inside the accept loop freed a connection's slot twice)."""
    for run in range(4):
        process, url = start_server(tmp_path, "--rewards", "mean_pixel", name=f"server{run}")
        stopping = threading.Event()

        def connect_until_stopped():
            while not stopping.is_set():
                try:
                    request(url, "GET", "/health")
                except (OSError, http.client.HTTPException, ValueError):
                    pass  # refused, reset or cut short while the server stops

        clients = [threading.Thread(target=connect_until_stopped) for _ in range(8)]
        for client in clients:
            client.start()
        try:
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=10)
        finally:
            stopping.set()
            for client in clients:
                client.join()
            process.kill()  # a no-op once it has exited
            log = process.communicate()[1].decode()
        assert code == 0 and "Traceback" not in log, log


@pytest.mark.parametrize("args, message", [
    (["--rewards", "mean_pixel", "--option", "mean_pixel.y=1"],
     "reward 'mean_pixel': got an unexpected keyword argument 'y' (options it takes: none)"),
    (["--rewards", "mean_pixel", "--option", "x.y=1"], "options given for rewards not in use: ['x']"),
    (["--rewards", "mean_pixel", "--option", "novalue"], "--option takes REWARD.KEY=VALUE"),
    (["--rewards", "counted"], "missing a required argument: 'log'"),
    (["--rewards", "mean_pixel:nan"], "bad weight 'nan'"),
    (["--rewards", "mean_pixel", "--max-connections", "0"], "must be positive"),
])
def test_bad_command_line_gives_one_line(args, message):
    run = subprocess.run([sys.executable, "-m", "flowgrpo_jax.rewards.server", "--plugin", PLUGIN,
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_work_folders_of_killed_clients_are_removed_at_the_next_start(tmp_path):
    script = ("import sys, time; from flowgrpo_jax.rewards.client import RewardClient; "
              f"c = RewardClient('mean_pixel', plugins=[{PLUGIN!r}]); "
              "print(c._workdir, flush=True); time.sleep(120)")
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        left_behind = trainer.stdout.readline().strip()
    finally:
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        trainer.stdout.close()
    assert os.path.isdir(left_behind)
    live = workdir.create(tmp_path)  # this process is alive: its folder stays
    dead = tmp_path / f"{workdir.PREFIX}{trainer.pid}-abc"
    dead.mkdir()
    assert workdir.remove_stale(tmp_path) == [dead] and live.is_dir()
    with RewardClient("mean_pixel", plugins=[PLUGIN]):
        assert not os.path.exists(left_behind)


def test_client_rejects_metadata_that_is_not_plain_json():
    with RewardClient("mean_pixel", plugins=[PLUGIN]) as client:
        with pytest.raises(ValueError, match="plain JSON"):
            client.submit(images_for(0, 1), ["a"], [{"x": float("nan")}])
        assert isinstance(client.score(images_for(0, 1), ["a"]).total, np.ndarray)

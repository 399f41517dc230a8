"""The trainer's side of the reward server: asynchronous scoring that survives server failures.

    with RewardClient("ocr:1.0,pickscore:0.5") as rewards:   # starts a local server process
        pending = rewards.submit(images, prompts)             # returns at once
        ...                                                   # sample the next batch meanwhile
        result = pending.result()                             # RewardResult: total, components

`RewardClient(url="http://host:port", token=...)` talks to a server started elsewhere instead.
A local server gets a random token of its own, so other processes on the host cannot use it.

A batch is sent with an id of its own; when a request fails (connection refused or reset,
timeout, the server process gone) the client restarts its local server, or waits and retries a
remote one, and sends the same batch again. The server caches results by batch id, so a re-sent
batch is never scored twice. After `max_failures` failed attempts on one batch, its result()
raises RuntimeError.
"""

import concurrent.futures
import dataclasses
import http.client
import itertools
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import numpy as np

from flowgrpo_jax.rewards import workdir
from flowgrpo_jax.rewards.protocol import (CONTENT_TYPE, TOKEN_ENV, ProtocolError, authorization,
                                           decode_result, encode_request)

# Failures worth a restart or a retry; anything else (a 4xx, a reward raising) is final.
_RETRYABLE = (OSError, http.client.HTTPException)
_GET_TIMEOUT = 60.0  # /health and /stats answer at once unless the host is overloaded
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class RewardResult:
    batch_id: str
    total: np.ndarray  # (N,) weighted sum of the components, in the order the images were sent
    components: dict  # name -> (N,), e.g. "ocr", "pickscore", "geneval_remote/accuracy"
    cached: bool  # True when the server answered from its cache (a re-sent batch)


class RewardServerError(RuntimeError):
    """The server answered, but refused the batch or failed to score it; not retried."""


class RewardServerUnreachable(RuntimeError):
    """No server answers at the client's URL when the client starts."""


class RewardClient:
    def __init__(self, rewards=None, *, url: str | None = None, options: dict | None = None,
                 plugins=(), max_failures: int = 3, request_timeout: float = 600.0,
                 startup_timeout: float = 600.0, retry_delay: float = 1.0, max_workers: int = 2,
                 server_args=(), token: str = ""):
        """rewards: "ocr:1.0,pickscore:0.5" or {"ocr": 1.0, ...} to start a local server;
        url: the address of a running server instead. options: {"pickscore": {"model": path}}.
        token: the shared secret of a server started with --token (sent with every request);
        a local server uses this one, or a random one when it is empty.
        plugins: modules or .py files that register extra rewards in the local server.
        max_workers batches are in flight at once (the server scores one at a time, the next
        one uploads meanwhile); a request that gets no answer for request_timeout seconds counts
        as a failure, so keep it above max_workers times the slowest batch's scoring time."""
        if (rewards is None) == (url is None):
            raise ValueError("give either rewards (to start a local server) or url (of a running one)")
        self.max_failures = max_failures
        self.request_timeout = request_timeout
        self.startup_timeout = startup_timeout
        self.retry_delay = retry_delay
        self._session = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        self._closed = False
        self._process = None
        self._generation = 0  # bumped at every (re)start, so concurrent failures restart once
        self._state_lock = threading.Lock()
        self._workdir = None
        self._local = url is None
        self._token = token or (secrets.token_urlsafe(24) if self._local else "")
        if url is not None:
            self._url = url.rstrip("/")
        else:
            if isinstance(rewards, dict):
                rewards = ",".join(f"{name}:{weight}" for name, weight in rewards.items())
            self._workdir = workdir.create()
            self._command = [sys.executable, "-m", "flowgrpo_jax.rewards.server",
                             "--rewards", rewards, "--port", "0", "--exit-with-parent",
                             "--cache-dir", str(self._workdir / "cache"), *map(str, server_args)]
            for name, reward_options in (options or {}).items():
                for key, value in reward_options.items():
                    self._command += ["--option", f"{name}.{key}={value}"]
            for plugin in plugins:
                self._command += ["--plugin", str(plugin)]
            try:
                self._start_process()
            except BaseException:
                self.close()
                raise
        try:
            self._max_request_bytes = self.health()["max_request_bytes"]
        except _RETRYABLE as e:
            self.close()
            raise RewardServerUnreachable(
                f"cannot reach the reward server at {self._url}: {e}") from e
        except BaseException:  # e.g. a 401: the server is there but refuses us
            self.close()
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="reward-client")

    @property
    def url(self) -> str:
        return self._url

    @property
    def server_pid(self) -> int | None:
        """Process id of the local server (None for a remote one)."""
        return self._process.pid if self._process else None

    def submit(self, images, prompts, metadata=None) -> concurrent.futures.Future:
        """Queues a batch (uint8 (N, H, W, 3), N prompts, N JSON-able dicts or None) and returns
        a Future of RewardResult. The images are copied before this returns."""
        if self._closed:
            raise RuntimeError("this RewardClient is closed")
        batch_id = f"{self._session}-{next(self._counter)}"
        body = encode_request(batch_id, np.asarray(images), prompts, metadata)
        if len(body) > self._max_request_bytes:
            raise ValueError(f"batch of {len(body)} bytes exceeds the reward server's limit of "
                             f"{self._max_request_bytes} bytes: submit smaller batches")
        return self._pool.submit(self._score, batch_id, body)

    def score(self, images, prompts, metadata=None) -> RewardResult:
        return self.submit(images, prompts, metadata).result()

    def health(self) -> dict:
        return self._get("/health")

    def stats(self) -> dict:
        return self._get("/stats")

    def close(self) -> None:
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        with self._state_lock:  # not while another thread is restarting the server
            self._stop_process()
        if pool:
            pool.shutdown(wait=True)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _score(self, batch_id: str, body: bytes) -> RewardResult:
        errors = []
        while True:
            with self._state_lock:
                url, generation = self._url, self._generation
            try:
                return self._post(url, batch_id, body)
            except _RETRYABLE as e:
                if self._closed:
                    raise RuntimeError(f"RewardClient closed while batch {batch_id} was in flight") from e
                errors.append(f"{type(e).__name__}: {e}")
                if len(errors) >= self.max_failures:
                    raise RuntimeError(f"reward batch {batch_id} failed {len(errors)} times against "
                                       f"{url}, giving up; errors: {errors}") from e
                if self._local:
                    self._restart(generation)
                else:
                    time.sleep(self.retry_delay * 2 ** (len(errors) - 1))

    def _post(self, url: str, batch_id: str, body: bytes) -> RewardResult:
        status, payload = self._request(url, "POST", "/score", body,
                                        {"Content-Type": CONTENT_TYPE})
        if status != 200:
            error = payload.get("error", payload) if isinstance(payload, dict) else payload
            raise RewardServerError(_one_line(
                f"reward server refused batch {batch_id}: HTTP {status}: {error}"))
        try:
            total, components = decode_result(payload)
        except ProtocolError as e:
            raise RewardServerError(_one_line(f"reward server's answer for batch {batch_id} "
                                              f"is unusable: {e}")) from None
        return RewardResult(batch_id=batch_id, total=total, components=components,
                            cached=bool(payload.get("cached")))

    def _get(self, path: str) -> dict:
        status, payload = self._request(self._url, "GET", path, timeout=_GET_TIMEOUT)
        if status != 200:
            error = payload.get("error", payload) if isinstance(payload, dict) else payload
            raise RewardServerError(_one_line(f"GET {self._url}{path} answered HTTP {status}: {error}"))
        return payload

    def _request(self, url, method, path, body=None, headers=None, timeout=None):
        parsed = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port,
                                                timeout=timeout or self.request_timeout)
        headers = dict(headers or {})
        if self._token:
            headers["Authorization"] = authorization(self._token)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(content)
        except json.JSONDecodeError:
            raise RewardServerError(f"{method} {url}{path} answered HTTP {response.status} with "
                                    f"a body that is not JSON: {content[:200]!r}") from None

    def _restart(self, seen_generation: int) -> None:
        with self._state_lock:
            if self._generation != seen_generation or self._closed:
                return  # another thread already restarted it
            self._stop_process()
            self._start_process()

    def _start_process(self) -> None:
        self._generation += 1
        port_file = self._workdir / f"port-{self._generation}"
        log_path = self._workdir / "server.log"
        env = dict(os.environ)
        env[TOKEN_ENV] = self._token
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            self._process = subprocess.Popen([*self._command, "--port-file", str(port_file)],
                                             stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while not port_file.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._stop_process()
                log_tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the local reward server did not start ({' '.join(self._command)}); "
                                   f"its log ends with:\n{log_tail}")
            time.sleep(0.05)
        self._url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())

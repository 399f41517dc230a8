"""The reward server: reward models loaded once, scoring batches sent over HTTP.

    python -m flowgrpo_jax.rewards.server --rewards ocr:1.0,pickscore:0.5 --port 8765

Endpoints (docs/rewards.md has the details):
    POST /score   a batch in the format of protocol.py -> JSON total + per-component rewards
    GET  /health  rewards and weights in use, request size limit
    GET  /stats   batches and images scored, cache hits (proves a re-sent batch is not rescored)

A batch id is scored at most once: results are cached by id (in memory, and on disk with
--cache-dir so that they survive a restart), and a re-send that arrives while the first copy
is still being scored waits for that copy.
"""

import argparse
import collections
import hashlib
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flowgrpo_jax.rewards import registry
from flowgrpo_jax.rewards.protocol import CONTENT_TYPE, ProtocolError, decode_request

log = logging.getLogger("flowgrpo_jax.rewards.server")
_DISCARD_LIMIT = 64 * 2**20


class RewardService:
    """Scoring with a batch-id cache; the HTTP layer only decodes and encodes."""

    def __init__(self, reward, cache_dir=None, cache_size: int = 4096):
        self.reward = reward
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_size = cache_size
        self.stats = collections.Counter(scored_batches=0, scored_images=0, cache_hits=0)
        self._lock = threading.Lock()  # guards the dicts and stats
        self._models = threading.Lock()  # one batch at a time on the reward models
        self._done = collections.OrderedDict()  # batch_id -> (digest, result)
        self._pending = {}  # batch_id -> (digest, Event) while being scored

    def score(self, batch_id: str, digest: str, images, prompts, metadata) -> dict:
        while True:
            with self._lock:
                entry = self._done.get(batch_id) or self._read_disk(batch_id)
                if entry is not None:
                    _check_same_batch(batch_id, entry[0], digest)
                    self.stats["cache_hits"] += 1
                    return dict(entry[1], cached=True)
                pending = self._pending.get(batch_id)
                if pending is None:
                    event = threading.Event()
                    self._pending[batch_id] = (digest, event)
                    break
            _check_same_batch(batch_id, pending[0], digest)
            pending[1].wait()  # then loop: the result is cached, or that attempt failed
        try:
            start = time.perf_counter()
            with self._models:
                total, components = self.reward(images, prompts, metadata)
            result = {
                "batch_id": batch_id,
                "total": total.tolist(),
                "components": {name: value.tolist() for name, value in components.items()},
                "seconds": time.perf_counter() - start,
            }
            with self._lock:
                self._remember(batch_id, digest, result)
                self.stats["scored_batches"] += 1
                self.stats["scored_images"] += len(images)
            return dict(result, cached=False)
        finally:
            with self._lock:
                del self._pending[batch_id]
            event.set()

    def stats_snapshot(self) -> dict:
        with self._lock:
            return dict(self.stats)

    def _remember(self, batch_id, digest, result) -> None:
        if self.cache_dir:
            path = self.cache_dir / f"{batch_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"digest": digest, "result": result}))
            os.replace(tmp, path)  # atomic: a crash leaves the old state or the whole entry
        self._done[batch_id] = (digest, result)
        while len(self._done) > self.cache_size:
            self._done.popitem(last=False)

    def _read_disk(self, batch_id):
        path = self.cache_dir / f"{batch_id}.json" if self.cache_dir else None
        if path is None or not path.exists():
            return None
        entry = json.loads(path.read_text())
        return entry["digest"], entry["result"]


def _check_same_batch(batch_id, known_digest, digest) -> None:
    if known_digest != digest:
        raise ProtocolError(f"batch_id {batch_id!r} was already used for a different batch", 409)


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, service: RewardService, weights: dict,
                 max_request_bytes: int, socket_timeout: float):
        self.service = service
        self.weights = weights
        self.max_request_bytes = max_request_bytes
        self.socket_timeout = socket_timeout
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardHTTPServer

    def setup(self):
        self.timeout = self.server.socket_timeout  # a stalled client cannot hold a thread forever
        super().setup()

    def do_GET(self):
        if self.path == "/health":
            self._reply(200, {"status": "ok", "rewards": self.server.weights,
                              "max_request_bytes": self.server.max_request_bytes, "pid": os.getpid()})
        elif self.path == "/stats":
            self._reply(200, self.server.service.stats_snapshot())
        else:
            self._reply(404, {"error": f"no such endpoint GET {self.path}; use /health, /stats or POST /score"})

    def do_POST(self):
        if self.path != "/score":
            self._discard_body()
            self._reply(404, {"error": f"no such endpoint POST {self.path}; use POST /score"})
            return
        try:
            body = self._read_body()
            batch_id, images, prompts, metadata = decode_request(body)
            digest = hashlib.sha256(body).hexdigest()
        except ProtocolError as e:
            self._reply(e.status, {"error": str(e)})
            return
        except (socket.timeout, ConnectionError) as e:
            log.warning("dropped a request whose body did not arrive: %s", e)
            self.close_connection = True
            return
        try:
            result = self.server.service.score(batch_id, digest, images, prompts, metadata)
        except ProtocolError as e:
            self._reply(e.status, {"error": str(e)})
        except Exception as e:  # a reward failing must not take the server down
            log.exception("scoring batch %s failed", batch_id)
            self._reply(500, {"error": f"scoring batch {batch_id} failed: {type(e).__name__}: {e}"})
        else:
            self._reply(200, result)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ProtocolError("a POST /score needs a valid Content-Length header", 411)
        length = int(length)
        if length > self.server.max_request_bytes:
            self._discard_body()
            raise ProtocolError(f"request of {length} bytes exceeds the server's limit of "
                                f"{self.server.max_request_bytes} bytes (--max-request-mb)", 413)
        if self.headers.get("Content-Type", CONTENT_TYPE) != CONTENT_TYPE:
            self._discard_body()
            raise ProtocolError(f"Content-Type must be {CONTENT_TYPE}, "
                                f"got {self.headers.get('Content-Type')!r}", 415)
        body = bytearray(length)  # writable, so reward functions get ordinary arrays
        view, received = memoryview(body), 0
        while received < length:
            count = self.rfile.readinto(view[received:])
            if not count:
                raise ConnectionError(f"body ended after {received} of {length} bytes")
            received += count
        return body

    def _discard_body(self) -> None:
        """Reads and drops a body we refuse (up to _DISCARD_LIMIT bytes) so that the client gets
        to read our answer; a longer one is cut off by closing the connection."""
        self.close_connection = True
        remaining = min(int(self.headers.get("Content-Length") or 0), _DISCARD_LIMIT)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
        except (socket.timeout, ConnectionError):
            pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.warning("client left before the answer to %s %s", self.command, self.path)

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


def parse_options(items) -> dict:
    """['ocr.x=1', 'pickscore.model=/m'] -> {'ocr': {'x': '1'}, 'pickscore': {'model': '/m'}}"""
    options = collections.defaultdict(dict)
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot and name and option):
            raise ValueError(f"--option takes REWARD.KEY=VALUE, got {item!r}")
        options[name][option] = value
    return dict(options)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", required=True, help="weighted rewards, e.g. ocr:1.0,pickscore:0.5")
    parser.add_argument("--option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                        help="passed to a reward's factory, e.g. pickscore.model=/models/pickscore")
    parser.add_argument("--plugin", action="append", default=[],
                        help="module or .py file whose import registers more rewards")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once ready to serve")
    parser.add_argument("--max-request-mb", type=float, default=512)
    parser.add_argument("--socket-timeout", type=float, default=120,
                        help="seconds a connection may stall while sending or receiving")
    parser.add_argument("--cache-dir", help="keep results here too, so a restarted server still "
                                            "knows which batches it scored")
    parser.add_argument("--cache-size", type=int, default=4096, help="results kept in memory")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the process that started this one is gone")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s reward-server %(levelname)s %(message)s")
    try:
        for plugin in args.plugin:
            registry.load_plugin(plugin)
        weights = registry.parse_weights(args.rewards)
        reward = registry.WeightedReward(weights, parse_options(args.option))
    except (KeyError, ValueError, ImportError, FileNotFoundError) as e:
        parser.exit(2, f"reward server: {e.args[0] if isinstance(e, KeyError) else e}\n")
    if args.exit_with_parent:
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    service = RewardService(reward, args.cache_dir, args.cache_size)
    server = RewardHTTPServer((args.host, args.port), service, weights,
                              int(args.max_request_mb * 2**20), args.socket_timeout)
    port = server.server_address[1]
    if args.port_file:
        tmp = pathlib.Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"reward server listening on http://{args.host}:{port} with {weights}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())

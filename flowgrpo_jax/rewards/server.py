"""The reward server: reward models loaded once, scoring batches sent over HTTP.

    python -m flowgrpo_jax.rewards.server --rewards ocr:1.0,pickscore:0.5 --port 8765

Endpoints (docs/rewards.md has the details):
    POST /score   a batch in the format of protocol.py -> JSON total + per-component rewards
    GET  /health  rewards and weights in use, the server's limits
    GET  /stats   batches and images scored, cache hits (proves a re-sent batch is not rescored)

Built for hostile clients: at most `max_connections` connections are served at once (more
wait in the listen backlog); each request must arrive, request line, headers and body
together, within one deadline; a body is read in chunks, so memory grows with the bytes that
arrived rather than with the length claimed; every refused request gets a one-line JSON error.
With a token, every request must carry it (`Authorization: Bearer <token>`).
"""

import argparse
import dataclasses
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flowgrpo_jax.rewards import registry
from flowgrpo_jax.rewards.deadline import DeadlinePassed, DeadlineReader
from flowgrpo_jax.rewards.protocol import (CONTENT_TYPE, TOKEN_ENV, ProtocolError, authorization,
                                           decode_request, describe)
from flowgrpo_jax.rewards.service import RewardService

log = logging.getLogger("flowgrpo_jax.rewards.server")
_ROUTES = {"/score": "POST", "/health": "GET", "/stats": "GET"}
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")  # more digits exceed any request size limit
_BODY_CHUNK = 1 << 20
_SLOT_WAIT_S = 0.5  # how often the accept loop, while at the connection limit, checks for shutdown
_LINGER_S = 2.0  # how long a refused request's remaining bytes are read and dropped
_LINGER_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 512 * 2**20
    max_connections: int = 32
    request_deadline_s: float = 120.0  # to receive one request; also bounds sending its answer


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, service: RewardService, weights: dict, limits: ServerLimits,
                 token: str = ""):
        self.service = service
        self.weights = weights
        self.limits = limits
        self.expected_authorization = authorization(token).encode("utf-8") if token else None
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, _Handler)

    def get_request(self):
        """Accepts a connection only while a slot is free; beyond max_connections, connections
        wait in the listen backlog. The OSError sends serve_forever back to its loop, where it
        notices a shutdown, and then here again."""
        if not self._slots.acquire(timeout=_SLOT_WAIT_S):
            raise OSError("connection limit reached")
        try:
            return super().get_request()
        except BaseException:
            self._slots.release()
            raise

    def shutdown_request(self, request):
        """Called once for every accepted connection when it ends; frees its slot."""
        try:
            super().shutdown_request(request)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # never HTTP/0.9, whose answers lack a status line
    disable_nagle_algorithm = True  # an answer's head and body go out as separate writes
    server: RewardHTTPServer

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket's own file object; reads go through the deadline instead
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.request_version = self.default_request_version

    def handle_one_request(self):
        """One request under one deadline for its request line, headers and body together."""
        self.reader.arm(self.server.limits.request_deadline_s)
        self.requestline, self.command, self.path = "", None, ""
        self._unread_body = False
        self._linger = False
        try:
            super().handle_one_request()
        except DeadlinePassed:
            self.close_connection = True
            if self.reader.received:  # an idle keep-alive connection just closes
                self._linger = True
                self._reply(HTTPStatus.REQUEST_TIMEOUT, {"error": (
                    f"request not received within {self.server.limits.request_deadline_s:g} s "
                    "(request line, headers and body together; --request-deadline)")})
        except OSError as e:  # reset by the client, or the like
            self.close_connection = True
            log.debug("connection from %s ended: %s", self.address_string(), e)
        if self._linger:
            self._drain()

    def parse_request(self):
        self.command = None
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.requestline.split()) != 3:
            self.send_error(HTTPStatus.BAD_REQUEST, "the request line must be METHOD PATH "
                                                    f"HTTP/1.x, got {describe(self.requestline)}")
            return False
        return super().parse_request()

    def handle_expect_100(self):
        """Defers "100 Continue" until the headers passed the checks (_read_body)."""
        return True

    def send_error(self, code, message=None, explain=None):
        """Errors that http.server finds itself (request line, header lines, unknown method),
        answered in JSON like all others."""
        self.close_connection = True
        self._linger = True
        text = message or HTTPStatus(code).phrase
        self._reply(code, {"error": f"{text}: {explain}" if explain else text})

    def _route(self):
        """GET and POST alike: the token, then the endpoint, then the method."""
        self._unread_body = "Transfer-Encoding" in self.headers or any(
            value.strip() != "0" for value in self.headers.get_all("Content-Length", []))
        if not self._authorized():
            return
        method = _ROUTES.get(self.path)
        if method is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": (
                f"no such endpoint {self.command} {describe(self.path)}; "
                "use GET /health, GET /stats or POST /score")})
        elif method != self.command:
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {
                "error": f"{self.path} answers {method} only, not {self.command}"},
                headers={"Allow": method})
        elif self.path == "/score":
            self._score()
        elif self.path == "/health":
            self._reply(HTTPStatus.OK, self._health())
        else:
            self._reply(HTTPStatus.OK, self.server.service.stats_snapshot())

    do_GET = do_POST = _route

    def _score(self):
        try:
            body = self._read_body()
            batch_id, images, prompts, metadata = decode_request(body)
        except ProtocolError as e:
            self._reply(e.status, {"error": str(e)})
            return
        digest = hashlib.sha256(body).hexdigest()
        try:
            result = self.server.service.score(batch_id, digest, images, prompts, metadata)
        except ProtocolError as e:
            self._reply(e.status, {"error": str(e)})
        except Exception as e:  # a reward failing must not take the server down
            log.exception("scoring batch %s failed", batch_id)
            message = f"scoring batch {batch_id} failed: {type(e).__name__}: {e}"
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": " ".join(message.split())})
        else:
            self._reply(HTTPStatus.OK, result)

    def _health(self) -> dict:
        limits = self.server.limits
        return {"status": "ok", "rewards": self.server.weights, "pid": os.getpid(),
                "max_request_bytes": limits.max_request_bytes,
                "max_connections": limits.max_connections,
                "request_deadline_s": limits.request_deadline_s}

    def _authorized(self) -> bool:
        expected = self.server.expected_authorization
        given = str(self.headers.get("Authorization", "")).encode("utf-8", "surrogateescape")
        if expected is None or hmac.compare_digest(given, expected):
            return True
        self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token: send the "
                                              "server's --token as 'Authorization: Bearer TOKEN'"},
                    headers={"WWW-Authenticate": "Bearer"})
        return False

    def _read_body(self) -> bytearray:
        if "Transfer-Encoding" in self.headers:
            raise ProtocolError("Transfer-Encoding is not supported: send the body with one "
                                "Content-Length", HTTPStatus.NOT_IMPLEMENTED)
        lengths = self.headers.get_all("Content-Length", [])
        if not lengths:
            raise ProtocolError("a POST /score needs a Content-Length header",
                                HTTPStatus.LENGTH_REQUIRED)
        if len(lengths) > 1:
            raise ProtocolError(f"{len(lengths)} Content-Length headers; send exactly one")
        if not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            raise ProtocolError("Content-Length must be a decimal byte count of at most 18 "
                                f"digits, got {describe(lengths[0])}")
        length = int(lengths[0])
        if length > self.server.limits.max_request_bytes:
            raise ProtocolError(f"request of {length} bytes exceeds the server's limit of "
                                f"{self.server.limits.max_request_bytes} bytes (--max-request-mb)",
                                HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if self.headers.get("Content-Type", CONTENT_TYPE) != CONTENT_TYPE:
            raise ProtocolError(f"Content-Type must be {CONTENT_TYPE}, "
                                f"got {describe(self.headers.get('Content-Type'))}",
                                HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        return self._receive(length)

    def _receive(self, length: int) -> bytearray:
        """The body: its first MiB read in place (a small body is never copied), the rest
        through a 1 MiB chunk appended to it, so memory grows with the bytes that arrive, not
        with the length claimed. A bytearray, so reward functions get writable arrays."""
        body, received = bytearray(min(length, _BODY_CHUNK)), 0
        with memoryview(body) as view:
            while received < len(body):
                received += self._read_some(view[received:], received, length)
        chunk = memoryview(bytearray(_BODY_CHUNK)) if received < length else None
        while received < length:
            count = self._read_some(chunk[:length - received], received, length)
            body += chunk[:count]
            received += count
        self._unread_body = False
        self.reader.disarm()
        return body

    def _read_some(self, view, received: int, length: int) -> int:
        count = self.rfile.readinto(view)
        if not count:
            self._unread_body = False
            self.close_connection = True
            raise ProtocolError(f"body ended after {received} of the {length} bytes announced")
        return count

    def _reply(self, status: int, payload: dict, headers=None) -> None:
        if self._unread_body:  # a refused body is not read: this connection cannot go on
            self.close_connection = self._linger = True
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        try:
            self.connection.settimeout(self.server.limits.request_deadline_s)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.requestline.split()[:1] != ["HEAD"]:  # set even when parsing failed
                self.wfile.write(body)
        except OSError as e:
            self.close_connection = True
            log.warning("could not answer %s %s: %s", self.command, describe(self.path), e)

    def _drain(self) -> None:
        """Half-closes, then reads and drops what the client still sends (for a short while):
        closing with unread bytes resets the connection, which can destroy the answer before
        the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.reader.arm(_LINGER_S)
            drained = 0
            while drained < _LINGER_BYTES:
                chunk = self.rfile.read1(1 << 16)
                if not chunk:
                    break
                drained += len(chunk)
        except (DeadlinePassed, OSError):
            pass

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


def parse_options(items) -> dict:
    """['ocr.x=1', 'pickscore.model=/m'] -> {'ocr': {'x': '1'}, 'pickscore': {'model': '/m'}}"""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot and name and option):
            raise ValueError(f"--option takes REWARD.KEY=VALUE, got {item!r}")
        options.setdefault(name, {})[option] = value
    return options


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(0)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", required=True, help="weighted rewards, e.g. ocr:1.0,pickscore:0.5")
    parser.add_argument("--option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                        help="passed to a reward's factory, e.g. pickscore.model=/models/pickscore")
    parser.add_argument("--plugin", action="append", default=[],
                        help="module or .py file whose import registers more rewards")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once ready to serve")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                        help=f"shared secret every request must carry (default: ${TOKEN_ENV}, "
                             "which keeps it out of the process list); empty: none")
    parser.add_argument("--max-request-mb", type=_positive(float),
                        default=ServerLimits.max_request_bytes / 2**20,
                        help="largest request accepted, in MiB (%(default)g)")
    parser.add_argument("--max-connections", type=_positive(int),
                        default=ServerLimits.max_connections,
                        help="connections served at once; more wait until one ends (%(default)d)")
    parser.add_argument("--request-deadline", type=_positive(float),
                        default=ServerLimits.request_deadline_s,
                        help="seconds a request may take to arrive, request line, headers and "
                             "body together (%(default)g)")
    parser.add_argument("--cache-dir", help="keep results here too, so a restarted server still "
                                            "knows which batches it scored")
    parser.add_argument("--cache-size", type=int, default=4096, help="results kept in memory")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the process that started this one is gone")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv=None) -> None:
    parser = _parser()
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
    limits = ServerLimits(int(args.max_request_mb * 2**20), args.max_connections,
                          args.request_deadline)
    try:
        server = RewardHTTPServer((args.host, args.port), service, weights, limits, args.token)
    except OSError as e:
        parser.exit(2, f"reward server: cannot listen on {args.host}:{args.port}: {e}\n")
    _shut_down_on_sigint(server)
    host, port = server.server_address[:2]
    if not is_loopback(host):
        log.warning("listening on %s, beyond loopback: anyone who can reach this port %s", host,
                    "must send the token" if args.token else "can use it (no --token given)")
    if args.port_file:
        tmp = pathlib.Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"reward server listening on http://{host}:{port} with {weights}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _shut_down_on_sigint(server: RewardHTTPServer) -> None:
    """Ctrl-C (SIGINT) ends serve_forever at its next poll, by a thread that waits for it. (A
    KeyboardInterrupt would land anywhere in the accept loop; inside socketserver's hand-over
    of a connection to its thread it freed the connection's slot twice.)"""
    interrupted = threading.Event()

    def shut_down():
        interrupted.wait()
        server.shutdown()

    threading.Thread(target=shut_down, daemon=True).start()
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())


if __name__ == "__main__":
    sys.exit(main())

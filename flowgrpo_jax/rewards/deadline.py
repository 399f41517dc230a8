"""Socket reads that all end at one deadline per request.

A plain socket timeout restarts with every byte received, so a client sending one byte a
second holds its connection forever. DeadlineReader gives each read only the time left until
the request's deadline; wrapped in an io.BufferedReader it is the handler's rfile.
"""

import io
import math
import time


class DeadlinePassed(Exception):
    """The request did not arrive in time. Not a TimeoutError on purpose: http.server swallows
    those and closes the connection without an answer, and this one must reach the handler."""


class DeadlineReader(io.RawIOBase):
    def __init__(self, sock):
        self._sock = sock
        self._deadline = math.inf
        self.received = 0  # bytes received since the last arm()

    def arm(self, seconds: float) -> None:
        """Starts the clock of a request: reads from now on end `seconds` from now."""
        self._deadline = time.monotonic() + seconds
        self.received = 0

    def disarm(self) -> None:
        """Lifts the deadline once the request has arrived (scoring and answering take their
        own time)."""
        self._deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed()
        self._sock.settimeout(None if remaining == math.inf else remaining)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise DeadlinePassed() from None
        self.received += count
        return count

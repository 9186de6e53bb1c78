"""A fault-injecting HTTP proxy on loopback, in front of an S3-compatible server (moto in the
tests), for the storage-fault tests and soak benchmarks.

Every client request is read whole and sent upstream on a connection of its own with
`Connection: close`, and the client connection is closed after the response, so a fault can hit
any single request (clients reconnect, as HTTP/1.1 allows). Faults:

  down     the port stops listening: connections are refused (an outage)
  reset    the connection is reset before any answer
  503      `503 Slow Down` with S3's XML error body (throttling)
  delay    the request waits `delay_s` before it is forwarded

each for a time window (`outage`, `start_fault` / `stop_fault`, `outage_for`), for the next N
requests (`fail_next`), or for a random fraction of requests (`fail_fraction`); an outage can
also start after N more forwarded requests (`outage_after`) or at the first request whose line
matches a pattern (`outage_on`, e.g. the upload of a checkpoint file). `counts` says how many
faults were injected and requests forwarded; `outage_started` when the last outage began.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

KINDS = ("down", "reset", "503", "delay")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class _Selective:
    """A fault on the requests matching `pattern` only, from the `start_left`+1-th request
    matching `start_on` on (None: at once)."""

    pattern: re.Pattern[bytes]
    kind: str
    start_on: re.Pattern[bytes] | None
    start_left: int
    fraction: float | None = None  # a random share of the matching requests only


@dataclass
class _Fault:
    kind: str
    until: float | None = None  # monotonic deadline of a time window
    remaining: int | None = None  # next N requests
    fraction: float | None = None  # random share of requests
    delay_s: float = 0.0


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        """`upstream`: http://host:port of the real server."""
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self._fault: _Fault | None = None
        self._lock = threading.Lock()
        self._counted = threading.Condition(self._lock)  # notified when a selective fault is counted
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._trigger: tuple[int, float, str] | None = None
        self._pattern: tuple[re.Pattern[bytes], float | None, str] | None = None
        self._pattern_left = 0  # matches to let through before the outage starts
        self._selective: _Selective | None = None
        self._generation = 0  # bumped by stop_fault: a trigger that fired before it does not start after
        self.outage_started: float | None = None  # time.monotonic() when the last outage began
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Listen on a free loopback port; returns the endpoint URL clients should use."""
        self._listen()
        threading.Thread(target=self._serve, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped.set()
        self._close_listener()

    def _listen(self) -> None:
        """Listen on `self.port` (a free one the first time). Only `start` and the serving thread
        call it; a rebind after an outage waits until the port is free again (the old listener
        may still be closing, or a client's ephemeral socket may hold the port for a while)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if self.port == 0 or self._stopped.wait(0.05):
                    sock.close()
                    raise
        sock.listen(64)
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self._listener = sock

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept
            with contextlib.suppress(OSError):
                listener.close()

    # --------------------------------------------------------------------- faults
    def start_fault(self, kind: str, delay_s: float = 0.0) -> None:
        """A fault on every request until `stop_fault` (a `down` outage closes the port)."""
        self._set(_Fault(kind, delay_s=delay_s))

    def stop_fault(self) -> None:
        """End every fault, and drop the ones still waiting for their trigger."""
        with self._lock:
            self._selective, self._trigger, self._pattern = None, None, None
            self._generation += 1
        self._set(None)

    def fail_matching(
        self,
        pattern: str,
        kind: str = "reset",
        start_on: str | None = None,
        nth: int = 1,
        fraction: float | None = None,
    ) -> None:
        """A fault (`reset` or `503`) on every request whose line matches `pattern` (or on a
        random `fraction` of them), the others forwarded, until `stop_fault`; with `start_on`,
        from the `nth` request matching it on (that request included when it matches
        `pattern`). It holds beside the time-window faults (`outage_for`, `outage_after`)."""
        if kind not in ("reset", "503"):
            raise ValueError(f"a selective fault is 'reset' or '503', got {kind!r}")
        with self._lock:
            self._selective = _Selective(
                re.compile(pattern.encode()),
                kind,
                re.compile(start_on.encode()) if start_on else None,
                nth - 1,
                fraction,
            )

    @contextlib.contextmanager
    def outage(self, kind: str = "down", delay_s: float = 0.0):
        self.start_fault(kind, delay_s)
        try:
            yield self
        finally:
            self.stop_fault()

    def outage_for(self, seconds: float, kind: str = "down") -> None:
        """A fault window of `seconds` from now, ended by the proxy itself (a fault schedule)."""
        self._set(_Fault(kind, until=time.monotonic() + seconds))

    def outage_after(self, requests: int, seconds: float, kind: str = "down") -> None:
        """An outage of `seconds` that starts once `requests` more requests were forwarded: a
        schedule tied to the client's progress rather than to the clock."""
        with self._lock:
            self._trigger = (self.counts["forwarded"] + requests, seconds, kind)

    def wait_selective(self, more_than: int, timeout: float) -> bool:
        """Block until the `fail_matching` fault has hit more than `more_than` requests (or
        `timeout` passed); whether it has."""
        with self._counted:
            return self._counted.wait_for(lambda: self.counts["selective"] > more_than, timeout)

    def outage_on(self, pattern: str, seconds: float | None, kind: str = "down", nth: int = 1) -> None:
        """An outage that starts at the `nth` request whose request line (method and path)
        matches the regular expression `pattern`, that request included; `seconds=None` keeps
        it until `stop_fault` (a permanent outage)."""
        with self._lock:
            self._pattern, self._pattern_left = (re.compile(pattern.encode()), seconds, kind), nth - 1

    def fail_next(self, n: int, kind: str = "503") -> None:
        self._set(_Fault(kind, remaining=n))

    def fail_fraction(self, fraction: float, kind: str = "503") -> None:
        self._set(_Fault(kind, fraction=fraction))

    def _set(self, fault: _Fault | None) -> None:
        if fault is not None and fault.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, got {fault.kind!r}")
        with self._lock:
            self._fault = fault
            if fault is not None and fault.remaining is None and fault.fraction is None:
                self.outage_started = time.monotonic()
        if fault is not None and fault.kind == "down" and fault.remaining is None and fault.fraction is None:
            self._close_listener()  # refused from now on; the serving thread listens again after it

    def _take(self, request: bytes = b"") -> _Fault | None:
        """The fault for the request at hand, if any (and count it)."""
        line = request.split(b"\r\n", 1)[0]
        with self._lock:
            rule = self._selective
            if rule is not None and rule.start_on is not None and rule.start_on.search(line):
                if rule.start_left == 0:
                    rule.start_on = None  # started
                else:
                    rule.start_left -= 1
            if (
                rule is not None
                and rule.start_on is None
                and rule.pattern.search(line)
                and (rule.fraction is None or self.rng.random() < rule.fraction)
            ):
                self.counts[rule.kind] += 1
                self.counts["selective"] += 1
                self._counted.notify_all()
                return _Fault(rule.kind)
            fault = self._fault
            if fault is None:
                return None
            if fault.until is not None and time.monotonic() >= fault.until:
                self._fault = None
                return None
            if fault.remaining is not None:
                if fault.remaining <= 0:
                    self._fault = None
                    return None
                fault.remaining -= 1
            if fault.fraction is not None and self.rng.random() >= fault.fraction:
                return None
            self.counts[fault.kind] += 1
            return fault

    def _count_forwarded(self) -> None:
        with self._lock:
            self.counts["forwarded"] += 1
            trigger = self._trigger
            fire = trigger is not None and self.counts["forwarded"] >= trigger[0]
            if fire:
                self._trigger = None
                self.counts["outages"] += 1
            generation = self._generation
        if fire:
            self._fire(generation, _Fault(trigger[2], until=time.monotonic() + trigger[1]))

    def _match_pattern(self, request: bytes) -> None:
        """Start the `outage_on` outage if this request's line matches its pattern."""
        with self._lock:
            pattern = self._pattern
            fire = pattern is not None and pattern[0].search(request.split(b"\r\n", 1)[0]) is not None
            if fire and self._pattern_left > 0:
                self._pattern_left -= 1
                fire = False
            if fire:
                self._pattern = None
                self.counts["outages"] += 1
            generation = self._generation
        if fire:
            _, seconds, kind = pattern
            self._fire(generation, _Fault(kind, until=None if seconds is None else time.monotonic() + seconds))

    def _fire(self, generation: int, fault: _Fault) -> None:
        """Start a triggered outage, unless `stop_fault` came in between."""
        with self._lock:
            if generation != self._generation:
                return
        self._set(fault)

    # --------------------------------------------------------------------- serving
    def _serve(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:  # down: refuse until the outage ends, then listen again
                with self._lock:
                    fault = self._fault
                    expired = fault is not None and fault.until is not None and time.monotonic() >= fault.until
                    if expired:
                        self._fault = None
                    down = fault is not None and fault.kind == "down" and not expired
                if not down:
                    with contextlib.suppress(OSError):
                        self._listen()
                    continue
                self._stopped.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        # a client that went away (a killed worker, a timed-out request) ends its own thread quietly
        with contextlib.closing(client), contextlib.suppress(OSError):
            client.settimeout(60)
            request = _read_request(client)
            if request is None:
                return
            self._match_pattern(request)
            fault = self._take(request)
            if fault is not None and fault.kind in ("reset", "down"):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closing with linger 0 sends RST
            if fault is not None and fault.kind == "503":
                head = (
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(SLOW_DOWN)}\r\nConnection: close\r\n\r\n"
                )
                client.sendall(head.encode() + SLOW_DOWN)
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay_s)
            self._count_forwarded()
            with contextlib.closing(socket.create_connection(self.upstream, timeout=60)) as upstream:
                upstream.sendall(request)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)


def _read_request(sock: socket.socket) -> bytes | None:
    """One whole HTTP request (head and Content-Length body), with `Connection: close` set."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = 0
    kept = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"content-length":
            length = int(line.split(b":", 1)[1])
        if name in (b"connection", b"keep-alive"):
            continue
        kept.append(line)
    if any(line.lower().startswith(b"expect:") for line in kept):
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        kept = [line for line in kept if not line.lower().startswith(b"expect:")]
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n" + body

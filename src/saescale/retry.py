"""Retrying object-storage calls through transient faults (connection refused or reset, timeouts,
5xx, SlowDown/throttling), with capped exponential backoff and jitter (0.5-1x), for a total time
budget; permanent faults (missing object, access denied, bad credentials) fail at once.

Object stores blip every day on a cloud, and a long run must wait them out instead of ending.
The budget defaults to `DEFAULT_BUDGET_S` and is set per process with `set_budget` (the jobs
pass `storage.retry_s`) or the environment variable `SAESCALE_STORAGE_RETRY_S`. Each retry is one
log line (what, attempt, wait), never a traceback.
"""

from __future__ import annotations

import errno
import os
import random
import re
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_BUDGET_S = 300.0
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 20.0
ENV_BUDGET = "SAESCALE_STORAGE_RETRY_S"

_budget_s: float | None = None

TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable
    errno.EAGAIN,
    getattr(errno, "EREMOTEIO", 121),  # s3fs: InternalError
}
# names of exception types (any module: botocore, aiohttp, urllib3, ...) that are transient
TRANSIENT_TYPES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "HTTPClientError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "FSTimeoutError",
    "IncompleteRead",
    "ProtocolError",
}
# (RetriesExhausted: an inner retry already spent the budget; an outer one must not start over)
PERMANENT_TYPES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "RetriesExhausted"}
# what an OSError's text says when the type does not (pyarrow's S3 errors, s3fs's wrapped ones)
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|SLOW_DOWN|Service ?Unavailable|SERVICE_UNAVAILABLE|Too ?Many ?Requests|Throttl|"
    r"RequestTimeout|InternalError|INTERNAL_FAILURE|NETWORK_CONNECTION|Couldn't connect|curlCode|"
    r"\b(500|502|503|504|429)\b|Connection (refused|reset|aborted)|timed out",
    re.IGNORECASE,
)


def set_budget(seconds: float | None) -> None:
    """This process's total retry time per call (None: the environment's, else the default)."""
    global _budget_s
    if seconds is not None and seconds < 0:
        raise ValueError(f"storage.retry_s must be >= 0, got {seconds!r}")
    _budget_s = seconds


def budget_s() -> float:
    if _budget_s is not None:
        return _budget_s
    return float(os.environ.get(ENV_BUDGET, DEFAULT_BUDGET_S))


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether waiting may fix this error (walks its causes: s3fs wraps botocore and aiohttp).
    A permanent cause anywhere in the chain wins."""
    chain = list(_chain(exc))
    for err in chain:
        if type(err).__name__ in PERMANENT_TYPES or isinstance(
            err, (FileNotFoundError, PermissionError, IsADirectoryError)
        ):
            return False
    for err in chain:
        name = type(err).__name__
        if name in TRANSIENT_TYPES or isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if isinstance(err, OSError) and (err.errno in TRANSIENT_ERRNOS or _TRANSIENT_TEXT.search(str(err))):
            return True
    return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n", 1)[0]
    return f"{type(exc).__name__}: {text[:200]}"


class RetriesExhausted(RuntimeError):
    """A transient fault outlasted the retry budget."""


def storage_outage(exc: BaseException) -> bool:
    """Whether `exc` is (or was caused by) storage that did not answer within its budget."""
    return any(isinstance(err, RetriesExhausted) for err in _chain(exc))


def call(
    what: str,
    fn: Callable[[], T],
    budget: float | None = None,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    budget_label: str | None = None,
) -> T:
    """fn(), retried while it raises transient errors, for at most `budget` seconds in total.
    Raises the permanent error at once, or `RetriesExhausted` (naming `what`, the attempts and
    the time) from the last transient one. `budget_label` is how the error names the budget
    (default `storage.retry_s=<budget>`)."""
    budget = budget_s() if budget is None else budget
    budget_label = budget_label or f"storage.retry_s={budget:g}"
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    start, attempt, wait, slept = time.monotonic(), 1, FIRST_WAIT_S, 0.0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; permanent ones re-raised as they are
            if not is_transient(exc):
                raise
            elapsed = max(time.monotonic() - start, slept)  # (a test's `sleep` may not take time)
            if elapsed >= budget:
                raise RetriesExhausted(  # its text names `what`: callers pass URLs already redacted
                    f"{what}: storage did not answer for {elapsed:.0f} s ({attempt} attempts; "
                    f"{budget_label}); last error {first_line(exc)}"
                ) from exc
            # jitter: replicas do not retry in step; the last attempt comes when the budget ends
            pause = min(random.uniform(0.5, 1.0) * min(wait, MAX_WAIT_S), budget - elapsed)
            log(f"[saescale] storage: {what} failed ({first_line(exc)}); attempt {attempt}, retrying in {pause:.1f} s")
            sleep(pause)
            slept += pause
            attempt += 1
            wait *= 2

"""What a failed Ray Train worker group means, decided in the Ray Train controller (a
`UserCallback`): let Ray restart the group (`FailureConfig(max_failures)`), or end the run with
one line.

- A corrupt shard, a checkpoint of another config, a bad batch or a non-finite loss: a restart
  would meet the same bytes or numbers again (the run is deterministic), so the run ends at once.
- Storage that stopped answering (a worker's call outlasted `storage.retry_s`, or a transient
  storage fault got through): the restart would fail the same way at once, spending one of
  `max_failures` on a fault that waiting outlives. So the controller first waits, up to
  `storage.retry_s`, for the run's storage to answer; then the group restarts and resumes from the
  last registered checkpoint. If storage stays silent the run ends with `StorageUnavailable`: one
  line naming the URL and what was tried, the last registered checkpoint intact for a rerun of
  the same command to resume from.
- Anything else (a killed worker, a node lost): Ray restarts the group.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from typing import Any

from saescale import retry
from saescale.console import first_line
from saescale.data.format import CorruptShardError
from saescale.train.checkpoint import CheckpointError
from saescale.train.trainer import RankError

# errors that a worker-group restart cannot fix: it would read the same bytes or the same
# checkpoint again, or meet the same bad batch or non-finite loss
NOT_RETRIED: tuple[type[BaseException], ...] = (CorruptShardError, CheckpointError, RankError)


class StorageUnavailable(RuntimeError):
    """The run's storage did not answer within `storage.retry_s`, then not within as long again
    before a restart: the run stops, its last registered checkpoint intact."""


# what the driver reports as the run's cause, in this order (a corrupt shard first: every rank
# reading the stream may fail on it, its peers only echo it as a RankError, and its message
# carries the remedy)
REPORTED: tuple[tuple[type[BaseException], ...], ...] = ((CorruptShardError,), (*NOT_RETRIED, StorageUnavailable))


def _behind(error: BaseException | None) -> Iterator[BaseException]:
    """Every exception behind a Ray task, worker group or controller error. Ray's RayTaskError
    copies pass `isinstance` for the original's type but their text is a remote traceback: the
    walk goes on to their `cause`, the original with its one-line message."""
    pending, seen = [error], set()
    while pending:
        exc = pending.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        pending += [
            exc.__context__,
            exc.__cause__,
            *(getattr(exc, "worker_failures", None) or {}).values(),
            getattr(exc, "controller_failure", None),
            getattr(exc, "cause", None),
        ]


def find_cause(
    error: BaseException | None, kinds: tuple[type[BaseException], ...] = NOT_RETRIED
) -> BaseException | None:
    """The error of exactly one of `kinds` behind `error`, if any."""
    return next((exc for exc in _behind(error) if type(exc) in kinds), None)


def first_cause(errors: list[BaseException]) -> BaseException | None:
    """The error behind any of several ranks' errors that the driver reports (`REPORTED`)."""
    for kinds in REPORTED:
        for error in errors:
            cause = find_cause(error, kinds)
            if cause is not None:
                return cause
    return None


def storage_fault(errors: list[BaseException]) -> BaseException | None:
    """The storage fault behind any of the errors: a call that outlasted its retry budget, else a
    transient storage error (connection refused or reset, 5xx, throttling)."""
    for error in errors:
        exhausted = find_cause(error, (retry.RetriesExhausted,))
        if exhausted is not None:
            return exhausted
    for error in errors:
        for exc in _behind(error):
            if isinstance(exc, OSError) and "RayTaskError" not in type(exc).__name__ and retry.is_transient(exc):
                return exc
    return None


def _probe(filesystem, path: str) -> None:
    """One storage round trip, not retried (`retry.call` around it does that)."""
    handler = getattr(filesystem, "handler", None)
    try:
        if handler is not None and hasattr(handler, "fs"):  # fsspec behind pyarrow: ask it directly
            handler.fs.invalidate_cache()
            handler.fs.info(path)
        else:
            filesystem.get_file_info(path)
    except FileNotFoundError:
        pass  # an answer all the same


def wait_for_storage(filesystem, path: str, url: str, fault: BaseException, budget: float) -> None:
    """Block until the run's storage answers, for up to `budget` seconds; raise
    `StorageUnavailable` if it does not."""
    say = functools.partial(print, file=sys.stderr, flush=True)
    say(
        f"[saescale] storage: a worker failed on storage ({first_line(fault)}); waiting up to {budget:g} s "
        f"for {url} to answer before restarting the workers"
    )
    try:
        retry.call(f"reach {url}", lambda: _probe(filesystem, path), budget=budget, log=lambda _: None)
    except Exception as exc:  # noqa: BLE001 - any failure to answer ends the run with one line
        raise stopped_by_storage(url, fault, f"no answer in {budget:g} s more before a restart") from exc
    say(f"[saescale] storage: {url} answers again; restarting the workers from the last registered checkpoint")


def stopped_by_storage(url: str, fault: BaseException, tried: str = "") -> StorageUnavailable:
    """The one line of a run that storage stopped."""
    return StorageUnavailable(
        f"storage {url} is unreachable: {first_line(fault)}{'; ' + tried if tried else ''}. The last "
        "registered checkpoint is intact: rerun the same command once storage answers to resume from it"
    )


@functools.cache
def _policy_class():
    from ray.train import ControllerError, UserCallback

    class FailurePolicy(UserCallback):
        """Runs in the Ray Train controller after a worker group failed (see the module)."""

        def __init__(self, storage_filesystem, storage_path: str, storage_url: str, wait_s: float) -> None:
            self.storage_filesystem, self.storage_path, self.storage_url = storage_filesystem, storage_path, storage_url
            self.wait_s = wait_s

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            errors = list(worker_exceptions.values())
            cause = first_cause(errors)
            if cause is not None:
                raise ControllerError(type(cause)(first_line(cause)))
            fault = storage_fault(errors)
            if fault is None:
                return  # a crash: Ray restarts the group
            try:
                wait_for_storage(self.storage_filesystem, self.storage_path, self.storage_url, fault, self.wait_s)
            except StorageUnavailable as stop:
                raise ControllerError(stop) from None

    return FailurePolicy


def failure_policy(storage_filesystem, storage_path: str, storage_url: str, wait_s: float):
    """The Ray Train `UserCallback` (for `RunConfig(callbacks=...)`) of the module's rules;
    `storage_url` (redacted) is what its lines name, `wait_s` (`storage.retry_s`) how long a
    restart waits for storage."""
    return _policy_class()(storage_filesystem, storage_path, storage_url, wait_s)

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
- A preemption notice (`service.preemption`: every rank checkpointed at a step boundary and
  raised `Preempted`): Ray restarts the group from that checkpoint, not counted as a failure.
- Anything else (a killed worker, a node lost): Ray restarts the group, at most
  `ray.max_failures` times in the run; then the run ends (`RestartsExhausted`). The policy
  counts these itself (Ray's own `max_failures` is unlimited) so that preemptions stay outside.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

from saescale import retry
from saescale.console import first_line, say
from saescale.data.builder import CacheError
from saescale.data.format import CorruptShardError
from saescale.lm.hooks import HookError
from saescale.lm.models import ModelLoadError
from saescale.service.capacity import NodeLost
from saescale.service.preemption import Preempted
from saescale.train.checkpoint import CheckpointError
from saescale.train.trainer import RankError

# errors that a worker-group restart cannot fix: it would read the same bytes or the same
# checkpoint again, or meet the same bad batch or non-finite loss
# (or, with data.source=model, run the same model on the same windows: NaN activations, a
# model that does not load or has no such hook, an unwritable write-through cache)
NOT_RETRIED: tuple[type[BaseException], ...] = (
    CorruptShardError,
    CheckpointError,
    RankError,
    CacheError,
    HookError,
    ModelLoadError,
)


class RestartsExhausted(RuntimeError):
    """The worker group failed more than `ray.max_failures` times (preemptions not counted)."""


class StorageUnavailable(RuntimeError):
    """The run's storage did not answer within `storage.retry_s`, then not within as long again
    before a restart: the run stops, its last registered checkpoint intact."""


# what the driver reports as the run's cause, in this order: a corrupt shard first (every rank
# reading the stream may fail on it, its peers only echo it as a RankError, and its message
# carries the remedy), then storage that stayed silent, then the rest
REPORTED: tuple[tuple[type[BaseException], ...], ...] = (
    (CorruptShardError,),
    (StorageUnavailable,),
    (NodeLost,),
    NOT_RETRIED,
    (RestartsExhausted,),
)


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
            getattr(exc, "health_check_failure", None),
        ]


def innermost(error: BaseException) -> BaseException:
    """The last error of the walk behind `error` that is not one of Ray's wrappers."""
    found = error
    for exc in _behind(error):
        if "ray." not in type(exc).__module__ and "RayTaskError" not in type(exc).__name__:
            found = exc
    return found


def find_cause(
    error: BaseException | None, kinds: tuple[type[BaseException], ...] = NOT_RETRIED
) -> BaseException | None:
    """The error of exactly one of `kinds` behind `error`, if any."""
    return next((exc for exc in _behind(error) if type(exc) in kinds), None)


def first_cause(
    errors: list[BaseException], order: tuple[tuple[type[BaseException], ...], ...] = REPORTED
) -> BaseException | None:
    """The error behind any of several ranks' errors that the driver reports, by `order`."""
    for kinds in order:
        for error in errors:
            cause = find_cause(error, kinds)
            if cause is not None:
                return cause
    return None


def is_preemption(error: BaseException) -> bool:
    """A rank that left on a preemption notice (`Preempted`), or that Ray saw die with its node
    reclaimed (`RayActorError.preempted`, after a drain)."""
    return any(isinstance(exc, Preempted) or getattr(exc, "preempted", False) is True for exc in _behind(error))


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
    for error in errors:  # only a peer's echo reached this poll: it carries the fault's text
        echo = find_cause(error, (RankError,))
        if echo is not None and "storage did not answer for" in str(echo):
            return echo
    return None


Probe = tuple[Any, str, str]  # (pyarrow filesystem, path in it, redacted URL for messages)


def _probe(filesystem, path: str) -> None:
    """One storage round trip, not retried (`retry.call` around it does that). Any answer
    counts, "no such object" or "access denied" too: only a transient fault is silence."""
    handler = getattr(filesystem, "handler", None)
    try:
        if handler is not None and hasattr(handler, "fs"):  # fsspec behind pyarrow: ask it directly
            handler.fs.invalidate_cache()
            handler.fs.info(path)
        else:
            filesystem.get_file_info(path)
    except Exception as exc:  # noqa: BLE001 - classified: transient is silence, the rest an answer
        if retry.is_transient(exc):
            raise


def wait_for_storage(probes: list[Probe], fault: BaseException, budget: float) -> None:
    """Block until the run's storage and the cache's answer, for up to `budget` seconds in
    all; raise `StorageUnavailable` (naming the one that did not) if they do not."""
    urls = " and ".join(dict.fromkeys(url for _, _, url in probes))
    say(
        f"[saescale] storage: a worker failed on storage ({first_line(fault)}); waiting up to {budget:g} s "
        f"for {urls} to answer before restarting the workers"
    )
    deadline = time.monotonic() + budget
    for filesystem, path, url in probes:
        try:
            retry.call(
                f"reach {url}",
                functools.partial(_probe, filesystem, path),
                budget=max(deadline - time.monotonic(), 0.0),
                log=lambda _: None,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to answer ends the run with one line
            why = f"no answer in {budget:g} s more before a restart"
            if not retry.storage_outage(exc):
                why += f" ({first_line(exc)})"
            raise stopped_by_storage(url, fault, why) from exc
    say(f"[saescale] storage: {urls} answers again; restarting the workers from the last registered checkpoint")


def stopped_by_storage(url: str, fault: BaseException, tried: str = "") -> StorageUnavailable:
    """The one line of a run that storage stopped."""
    from saescale import storage

    return StorageUnavailable(
        storage.redact(
            f"storage {url} is unreachable: {first_line(fault)}{'; ' + tried if tried else ''}. The last "
            "registered checkpoint is intact: rerun the same command once storage answers to resume from it"
        )
    )


@functools.cache
def _policy_class():
    from ray.train import ControllerError, UserCallback

    class FailurePolicy(UserCallback):
        """Runs in the Ray Train controller after a worker group failed (see the module)."""

        def __init__(self, probes: list[Probe], wait_s: float, max_failures: int) -> None:
            self.probes, self.wait_s, self.max_failures = probes, wait_s, max_failures
            self.failures = 0

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            errors = list(worker_exceptions.values())
            if errors and all(is_preemption(e) for e in errors):
                notice = find_cause(errors[0], (Preempted,))
                notice = first_line(notice) if notice is not None else "a node was preempted"
                say(f"[saescale] {notice}: restarting the workers from it (not counted against ray.max_failures)")
                return
            # a corrupt shard first; then a storage fault, whose peers' RankErrors only echo it
            cause = first_cause(errors, ((CorruptShardError,),))
            fault = None if cause is not None else storage_fault(errors)
            if fault is None:
                cause = cause or first_cause(errors)
                if cause is not None:
                    raise ControllerError(type(cause)(first_line(cause)))
            self.failures += 1  # a crash or a storage fault: a restart spent
            if self.failures > self.max_failures:
                if fault is not None:  # storage again: name it, as a wait that timed out would
                    raise ControllerError(stopped_by_storage(self.probes[0][2], fault))
                raise ControllerError(
                    RestartsExhausted(
                        f"{self.failures} worker-group failures (ray.max_failures={self.max_failures}); the last: "
                        f"{first_line(errors[0]) if errors else 'no error reported'}"
                    )
                )
            if fault is not None:
                try:
                    wait_for_storage(self.probes, fault, self.wait_s)
                except StorageUnavailable as stop:
                    raise ControllerError(stop) from None
            # storage answers, or a crash: Ray restarts the group

    return FailurePolicy


def failure_policy(probes: list[Probe], wait_s: float, max_failures: int):
    """The Ray Train `UserCallback` (for `RunConfig(callbacks=...)`) of the module's rules;
    `probes` are what a restart after a storage fault waits for (the run's storage, the cache),
    `wait_s` (`storage.retry_s`) for how long; `max_failures` restarts after crashes at most."""
    return _policy_class()(probes, wait_s, max_failures)

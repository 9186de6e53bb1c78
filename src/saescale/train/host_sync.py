"""Host synchronisation: finding it (`HostSyncAudit`) and reading a device value without it (`LaggedRead`).

On a GPU, an op whose result the host must see (`.item()`, `int(t)`, `.tolist()`, `nonzero()`,
a boolean mask index, `bincount`, `unique`) makes the CPU wait until every queued kernel has run:
the launch queue drains and the GPU idles while the host catches up. A step with several such
reads runs at the speed of its launches, not of its arithmetic. `torch.cuda.set_sync_debug_mode`
catches them on a GPU; `HostSyncAudit` lists the same ops on any device (a CPU has no queue to
drain, so the CPU tests use it to hold the CUDA step to the same rule).
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output the host must read before it can go on (value or output size)
_SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "nonzero",
    "nonzero_static",  # (static only in name on CPU; listed so a CPU audit is conservative)
    "bincount",
    "unique_consecutive",
    "_unique",
    "_unique2",
    "unique_dim",
    "masked_select",
    "_assert_async",
}
# ops that sync only when an index is a boolean mask (it becomes nonzero())
_MASK_INDEXED_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}

_host_tensors: weakref.WeakSet[Tensor] = weakref.WeakSet()


def mark_host(t: Tensor) -> Tensor:
    """Declare `t` a host copy (reading it makes no device wait; on a CPU-only run the audit
    cannot tell otherwise). Returns `t`."""
    _host_tensors.add(t)
    return t


def _is_host(t: Any) -> bool:
    try:
        return isinstance(t, Tensor) and t in _host_tensors
    except TypeError:  # pragma: no cover - an unhashable tensor subclass
        return False


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module (who asked for the read)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{__name__.replace('.', '/')}.py" not in path and "/torch/" not in path:
            return f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in (indices or ()))


class HostSyncAudit:
    """Counts the host-synchronising ops run inside it: `with HostSyncAudit() as audit: ...`,
    then `audit.syncs` (a Counter of op names, empty when sync-free) and `audit.where` (the
    first few reads: op name and calling file:line, in order). Reads of tensors passed to `mark_host` are
    not counted."""

    def __init__(self) -> None:
        self.syncs: Counter[str] = Counter()
        self.where: list[str] = []
        self._dispatch = _DispatchAudit(self)
        self._function = _FunctionAudit(self)

    def note(self, name: str) -> None:
        self.syncs[name] += 1
        if len(self.where) < 20:
            self.where.append(f"{name} at {_caller()}")

    def __enter__(self) -> HostSyncAudit:
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)


class _DispatchAudit(TorchDispatchMode):
    def __init__(self, audit: HostSyncAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS and not (args and _is_host(args[0])):
            self.audit.note(f"aten.{name}")
        elif name in _MASK_INDEXED_OPS and _has_bool_index(args):
            self.audit.note(f"aten.{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


class _FunctionAudit(TorchFunctionMode):
    """`Tensor.tolist` reads the data without a dispatched op; caught here."""

    def __init__(self, audit: HostSyncAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if func is Tensor.tolist and args and not _is_host(args[0]):
            self.audit.note("Tensor.tolist")
        return func(*args, **(kwargs or {}))


class LaggedRead:
    """A device scalar read on the host without waiting for it: `record(t)` starts a
    non-blocking copy; `latest()` returns the newest recorded value whose copy has landed
    (on CUDA usually the previous step's), or `default` before any has; `age` is how many
    values were recorded after it (the host may run several steps ahead of the device)."""

    def __init__(self, default: int | None = None) -> None:
        self.value = default
        self.age = 0
        self._pending: list[tuple[Tensor, Any]] = []

    def record(self, t: Tensor) -> None:
        if t.device.type == "cuda":
            host = torch.empty((), dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = t.detach().clone(), None
        self._pending.append((mark_host(host), event))

    def latest(self) -> int | None:
        while self._pending:
            host, event = self._pending[0]
            if event is not None and not event.query():
                break
            self.value = int(host)
            self._pending.pop(0)
        self.age = len(self._pending)
        return self.value

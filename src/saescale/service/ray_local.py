"""Start or join Ray with settings that work on small machines and in CI.

With no address this starts its own embedded local Ray (`address="local"`: never whatever
cluster Ray's current-cluster file names, such as a `ray start --head` left running or one that
died); with an address (or RAY_ADDRESS, as under `ray job submit`) it joins that cluster on
purpose. Either way it prints one line saying which. Environment defaults avoid the pitfalls
measured on 2-core machines: the Parquet V2 reader's 32 footer actors, token auth prompts, usage
stats. Ray's own chatter is kept out of the console but not out of its log files: Ray Data logs
INFO to `<session>/logs/ray-data/ray-data.log` only (warnings and errors still print), and the
workers of this job talk to their own cluster, not to another Ray on the same machine, and do not
repeat a harmless warning every second (see `setup_worker_process`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

# Ray Data's own logging config, with the console at WARNING (its file handler keeps DEBUG)
RAY_DATA_LOGGING_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")

_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    # a raylet starts a Python worker per CPU for its first driver, without a runtime env; every
    # task and actor of this job has one (the setup hook below), so none of them could use those
    # workers: ~1.5 s of CPU each, spent for nothing (measured: 10% of a sweep test's CPU)
    "RAY_prestart_worker_first_driver": "0",
}
if os.path.exists(RAY_DATA_LOGGING_YAML):  # read by every process that imports ray.data
    _DEFAULTS["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_LOGGING_YAML

# Ray Train's detached helper that removes a crashed controller's placement group asks the
# dashboard's State API every second; without that module (include_dashboard=False, as for the
# embedded Ray, which ends with this process, placement groups included) it logs this each time
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANER_NOISE = "State API may be temporarily unavailable"
# Ray Train's controller asks an autoscaling coordinator for its workers' resources with a 5 s
# timeout; on a loaded machine the answer is late and it logs a warning that says it is "safe to
# ignore" with a whole traceback, which reads like a crash in the job's console
_AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
# At the end of a run the controller stops that helper and waits for the call; when the helper's
# own exit (its worker leaving with INTENDED_USER_EXIT) answers first, Ray logs "Failed to stop
# PlacementGroupCleaner gracefully" with a whole traceback of an exit that went as intended
# (seen on a loaded machine); a cleaner that really failed to stop says something else
_PG_CALLBACK_LOGGER = "ray.train.v2._internal.callbacks.placement_group_callback"


def _not_an_intended_cleaner_exit(record: logging.LogRecord) -> bool:
    """Drop the controller's "Failed to stop PlacementGroupCleaner" record when the error it
    carries is the helper's intended exit; keep every other record."""
    if not record.getMessage().startswith("Failed to stop PlacementGroupCleaner"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    return "INTENDED_USER_EXIT" not in str(error)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Keep the record (its one line), drop the traceback attached to it."""
    record.exc_info, record.exc_text = None, None
    return True


def apply_env_defaults() -> None:
    """Set the defaults above unless the user set them. Call before anything imports ray:
    Ray Data reads some of them once, at import."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)


class RayDataConsoleFilter(logging.Filter):
    """The console filter of Ray Data's loggers (ray_data_logging.yaml): drops what Ray Data hides
    itself (records marked `hide`) and its advice about its own progress display ("Progress bars
    disabled. To enable, ..."): the training job turns those bars off on purpose. Errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):
            return False
        return record.levelno >= logging.ERROR or not record.name.startswith("ray.data._internal.progress")


def setup_worker_process() -> None:
    """Ray's `worker_process_setup_hook` for the worker processes of the jobs started here.

    Ray code inside a worker that looks a cluster up by itself (the State API client of Ray
    Train's placement-group cleaner) finds it from RAY_ADDRESS, else from the machine's newest
    `ray start` or any Ray it sees running: another user's or test's cluster on the same machine,
    which does not know the controller it watches: it would take the run for dead and remove its
    placement group.
    Pointing RAY_ADDRESS at the worker's own cluster keeps those queries at home. The cleaner's
    "State API may be temporarily unavailable" loop (see above) is dropped; its other records stay.
    The autoscaling client's late-answer warning keeps its line and loses its traceback; the
    controller's report of the cleaner's intended exit as a failure to stop it is dropped.
    A SIGTERM to a training worker is a preemption notice (`service.preemption`)."""
    import ray

    from saescale.service.preemption import watch_sigterm

    watch_sigterm()

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(_PG_CLEANER_LOGGER).addFilter(lambda record: _PG_CLEANER_NOISE not in record.getMessage())
    logging.getLogger(_AUTOSCALING_CLIENT_LOGGER).addFilter(_without_traceback)
    logging.getLogger(_PG_CALLBACK_LOGGER).addFilter(_not_an_intended_cleaner_exit)


_HOOK = f"{__name__}.setup_worker_process"


@contextlib.contextmanager
def _agent_on_a_free_port():
    """Inside: a Ray that `ray.init()` starts puts its dashboard agent (the job agent behind the
    job server) on a free port, not Ray's fixed 52365. `ray.init()` has no parameter for it (only
    `ray start --dashboard-agent-listen-port` has), and with the fixed port a second Ray on the
    machine (the README's `ray start --head`, another job's embedded Ray, a parallel test) finds
    it taken: that Ray's job server then answers every submit with "No available agent". Ray 2.60
    builds its `RayParams` in `ray.init()` (the version is pinned in constraints.txt)."""
    from ray._private import parameter

    from saescale.net import free_port

    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", free_port())
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def _own_temp_dir() -> str:
    """A fresh temp dir for one embedded Ray, beside Ray's own (under $RAY_TMPDIR, else the
    system's temp dir), with a short name: Ray's socket paths inside it must stay short."""
    import sys
    import tempfile

    base = os.environ.get("RAY_TMPDIR") or ("/tmp" if sys.platform == "darwin" else tempfile.gettempdir())  # as Ray
    return tempfile.mkdtemp(prefix="ray-", dir=base)


@dataclass
class RayStarted:
    """Which Ray this process uses: its own embedded one, or a cluster it joined."""

    embedded: bool
    address: str  # the GCS address
    dashboard_url: str | None  # host:port, when the cluster has a dashboard
    session_dir: str | None  # on this machine: <session>/logs holds Ray's log files


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    dashboard_port: int | None = None,
    log_to_driver: bool = True,
) -> RayStarted | None:
    """Join `address` (else RAY_ADDRESS) or start an embedded local Ray; None if this process
    is connected already. `dashboard_port` gives the embedded Ray a dashboard (and job server)
    on 127.0.0.1; without it, none (it costs about 1 GB and seconds of startup)."""
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # the workers this job starts get the setup hook too (a job config may bring its own)
        hook = None if "worker_process_setup_hook" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") else _HOOK
        ctx = ray.init(
            address=address,
            log_to_driver=log_to_driver,
            runtime_env={"worker_process_setup_hook": hook} if hook else None,
        )
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        gcs = ctx.address_info.get("gcs_address") or address
        print(
            f"[saescale] Ray: joined the running cluster at {gcs} ({resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs on {nodes} node(s))",
            flush=True,
        )
        return RayStarted(False, gcs, ctx.dashboard_url or None, ctx.address_info.get("session_dir"))
    dashboard = (
        {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port}
        if dashboard_port is not None
        else {"include_dashboard": False}
    )
    cpus = num_cpus or os.cpu_count() or 1
    # a Ray with a job server runs in a temp dir of its own that names it as the current cluster:
    # Ray's job supervisor hands each job the cluster it finds for address "auto" in the node's
    # temp dir, else any Ray it sees running on the machine (another test's, a `ray start --head`)
    own_temp = _own_temp_dir() if dashboard_port is not None else None
    # address="local": a new Ray of our own, even when a `ray start` cluster is running or a dead
    # one left its address in $RAY_TMPDIR/ray/ray_current_cluster
    with _agent_on_a_free_port():
        ctx = ray.init(
            address="local",
            num_cpus=cpus,
            log_to_driver=log_to_driver,
            **dashboard,
            **({"_temp_dir": own_temp} if own_temp else {}),
            runtime_env={"env_vars": {k: os.environ[k] for k in _DEFAULTS}, "worker_process_setup_hook": _HOOK},
        )
    if own_temp:
        with open(os.path.join(own_temp, "ray_current_cluster"), "w") as current:
            current.write(ctx.address_info["gcs_address"])
    session = ctx.address_info.get("session_dir")
    print(
        f"[saescale] Ray: started an embedded local Ray ({cpus} CPUs"
        + (f": logical, what the run asks for, on {os.cpu_count()} cores" if cpus != os.cpu_count() else "")
        + (f", dashboard http://{ctx.dashboard_url}" if ctx.dashboard_url else "")
        + f"; logs in {os.path.join(session, 'logs') if session else '?'}); it stops when this process ends "
        "(set ray.address or RAY_ADDRESS to use a running cluster)",
        flush=True,
    )
    return RayStarted(True, ctx.address_info.get("gcs_address", ""), ctx.dashboard_url or None, session)

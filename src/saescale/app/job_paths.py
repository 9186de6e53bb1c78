"""Paths a job may read and write when it runs from a Ray runtime-env working_dir package.

`ray job submit --working-dir .` runs the entrypoint in Ray's unpacked copy of that directory,
`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>`: a relative path
resolves inside the copy, which has none of the data the .gitignore leaves out (runs/) and which
Ray deletes once no job uses it. A cache written there "succeeds" and is lost; a default relative
data.cache is not found. Such a job must be given absolute paths (one machine) or shared URLs
(s3://..., a real cluster), and this module says so in one line before anything is read or written.
No Ray import: the signals are the working directory and the job config Ray passes in the
environment.
"""

from __future__ import annotations

import json
import os

from saescale import storage

# the job supervisor passes the job's runtime_env to the entrypoint in this variable
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_PACKAGE_DIRS = ("runtime_resources", "working_dir_files")


class JobPathError(ValueError):
    """A path that would be read from or written into Ray's temporary working-dir copy."""


def working_dir_package(cwd: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The Ray working_dir package this process runs in, or None. The working directory lies in
    Ray's `runtime_resources/working_dir_files/` (where Ray unpacks every uploaded working_dir),
    or the job's runtime_env names an uploaded working_dir (not an in-place `local://` one)."""
    cwd = os.path.realpath(cwd or os.getcwd())
    parts = cwd.split(os.sep)
    for i in range(len(parts) - 2):
        if tuple(parts[i : i + 2]) == _PACKAGE_DIRS:
            return os.sep.join(parts[: i + 3])
    environ = os.environ if environ is None else environ
    try:
        runtime_env = json.loads(environ.get(_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    if working_dir and not str(working_dir).startswith("local://"):
        return cwd
    return None


def _session_dir(package: str) -> str:
    """Ray's session directory holding the package (everything in it is Ray's temporary state)."""
    parts = package.split(os.sep)
    for i in range(len(parts) - 1):
        if tuple(parts[i : i + 2]) == _PACKAGE_DIRS:
            return os.sep.join(parts[:i])
    return package


def local_side_dir(*parts: str) -> str:
    """An absolute local folder for a run's side files (metrics, offline wandb, Hydra's own
    files) when its output_dir is remote: under $SAESCALE_RUNS (default `runs`), except that a
    relative one inside Ray's working-dir copy would be lost with it, so there it is
    ~/.cache/saescale/runs instead."""
    base = os.environ.get("SAESCALE_RUNS", "runs")
    if not os.path.isabs(base) and working_dir_package() is not None:
        base = os.path.join(os.path.expanduser("~"), ".cache", "saescale", "runs")
    return os.path.abspath(os.path.join(base, *parts))


def check_job_paths(
    reads: dict[str, str] | None = None, writes: dict[str, str] | None = None, package: str | None = None
) -> None:
    """Raise JobPathError, in one line naming every offending setting and what to pass instead,
    if this process runs in a Ray working_dir package and a path it reads (`reads`, setting name
    -> URL) or writes (`writes`) is local and resolves into Ray's temporary files: a relative
    path, or one inside Ray's session directory. Other URLs and absolute paths outside it are
    left to the job (an absolute path is shared only on a one-machine cluster). The package is
    found from this process unless given."""
    package = package if package is not None else working_dir_package()
    if package is None:
        return
    named = {**(reads or {}), **(writes or {})}
    session = _session_dir(package)
    relative, inside = [], []
    for name, url in named.items():
        path = storage.local_path(str(url or ""))
        if path is None:
            continue
        if not os.path.isabs(path):
            relative.append((name, path, url))
        elif os.path.realpath(path) == session or os.path.realpath(path).startswith(session.rstrip(os.sep) + os.sep):
            inside.append((name, path, url))
    if not relative and not inside:
        return
    effect = " and ".join(
        part
        for part, used in (
            ("what the job writes would be lost with it", any(n in (writes or {}) for n, _, _ in relative + inside)),
            ("what it reads is not there", any(n in (reads or {}) for n, _, _ in relative + inside)),
        )
        if used
    )
    problems = []
    if relative:
        problems.append(f"{_listing(relative)} {'is a relative path' if len(relative) == 1 else 'are relative paths'}")
    if inside:
        problems.append(
            f"{_listing(inside)} {'lies' if len(inside) == 1 else 'lie'} in Ray's session directory ({session})"
        )
    examples = (
        " ".join(f"{name}=$PWD/{os.path.normpath(path)}" for name, path, _ in relative)
        or "absolute paths outside Ray's session directory"
    )
    raise JobPathError(
        f"{' and '.join(problems)}, but this job runs in Ray's temporary copy of the working directory "
        f"({package}), so {effect}: pass {examples} on a one-machine cluster, or shared URLs such as "
        f"s3://bucket/... on a real one"
    )


def _listing(items: list[tuple[str, str, str]]) -> str:
    return ", ".join(f"{name}={url}" for name, _, url in items)

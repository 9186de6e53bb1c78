"""How the jobs find and use Ray, as a new user meets it: the paths a job submitted with
`--working-dir` may read and write. The embedded default beside a running `ray start --head`,
with a console without Ray's own chatter (but with its errors, and with its log files kept), is
checked on the resumed run of tests/test_train_job.py
(`test_embedded_ray_beside_a_running_head_with_a_quiet_console`): one Ray job serves both."""

from __future__ import annotations

import os

import pytest

from saescale.app.job_paths import JobPathError, check_job_paths, working_dir_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "/tmp/rt/ray/session_2026-01-01_00-00-00_1_2/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_a_job_in_rays_working_dir_copy_is_told_which_paths_to_pass():
    # the signal: the working directory is inside Ray's unpacked working_dir packages ...
    assert working_dir_package(PACKAGE + "/jobs", environ={}) == PACKAGE
    # ... or the job config Ray hands the entrypoint names an uploaded working_dir
    config = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}}'
    assert working_dir_package(ROOT, environ={"RAY_JOB_CONFIG_JSON_ENV_VAR": config}) == os.path.realpath(ROOT)
    in_place = '{"runtime_env": {"working_dir": "local:///srv/app"}}'
    assert working_dir_package(ROOT, environ={"RAY_JOB_CONFIG_JSON_ENV_VAR": in_place}) is None
    assert working_dir_package(ROOT, environ={}) is None

    with pytest.raises(JobPathError) as err:
        check_job_paths(
            reads={"data.cache": "runs/cache/smollm2-resid8"},
            writes={"output_dir": "s3://bucket/out", "storage.url": "file://runs/ray"},
            package=PACKAGE,
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.cache=runs/cache/smollm2-resid8, storage.url=file://runs/ray are relative paths")
    assert (
        "pass data.cache=$PWD/runs/cache/smollm2-resid8 storage.url=$PWD/runs/ray on a one-machine cluster" in message
    )
    assert "s3://" in message and "output_dir" not in message
    with pytest.raises(JobPathError, match=r"sae=/tmp/rt/ray/session_.*/x lies in Ray's session directory"):
        check_job_paths(reads={"sae": PACKAGE + "/x"}, package=PACKAGE)
    # absolute paths outside Ray's files and shared URLs pass; so does anything outside a package
    check_job_paths(reads={"data.cache": "/data/cache"}, writes={"output": "s3://bucket/c"}, package=PACKAGE)
    check_job_paths(reads={"data.cache": "runs/cache"}, writes={"output": "runs/x"}, package=None)


def test_the_controllers_report_of_the_cleaners_intended_exit_is_dropped_and_real_failures_stay():
    """Seen once in the suite on a loaded machine: Ray Train's controller logged "Failed to stop
    PlacementGroupCleaner gracefully" with the traceback of the helper's own intended exit."""
    import logging
    import sys

    from saescale.service.ray_local import _not_an_intended_cleaner_exit

    def record(message: str, error: BaseException | None) -> logging.LogRecord:
        try:
            if error is not None:
                raise error
        except BaseException:  # noqa: BLE001 - the record carries it, as logger.exception does
            exc_info = sys.exc_info()
        else:
            exc_info = None
        return logging.LogRecord("x", logging.ERROR, __file__, 1, message, None, exc_info)

    died = RuntimeError("The actor is dead because its worker process has died. Worker exit type: INTENDED_USER_EXIT")
    assert not _not_an_intended_cleaner_exit(record("Failed to stop PlacementGroupCleaner gracefully.", died))
    assert _not_an_intended_cleaner_exit(
        record("Failed to stop PlacementGroupCleaner gracefully.", TimeoutError("get"))
    )
    assert _not_an_intended_cleaner_exit(record("Failed to stop PlacementGroupCleaner gracefully.", None))
    assert _not_an_intended_cleaner_exit(record("A worker died: INTENDED_USER_EXIT", died))

"""How a job reports bad input: one `error:` line on stderr and a non-zero exit, no traceback.

A traceback is for a bug in saescale; a wrong path, a bad setting, an unreachable bucket or a
damaged shard is the user's to fix, and the message names what and how.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from saescale.app.job_paths import JobPathError
from saescale.console import one_line
from saescale.core.config import ConfigError
from saescale.data.builder import CacheError
from saescale.data.format import CorruptShardError
from saescale.distributed.mesh import MeshError
from saescale.distributed.plan import PlanError
from saescale.formats.saved import SavedSAEError
from saescale.lm.corpus import CorpusError
from saescale.lm.hooks import HookError
from saescale.lm.models import ModelLoadError
from saescale.retry import storage_outage
from saescale.storage import StorageError
from saescale.train.checkpoint import CheckpointError

EXIT_BAD_INPUT = 2  # a setting, a path or the data is wrong
EXIT_FAILED = 1  # training failed after its restarts

# what bad input, a bad store or a damaged cache raises (ConfigError covers the config schema)
USER_ERRORS: tuple[type[BaseException], ...] = (
    CacheError,
    CheckpointError,
    ConfigError,
    CorpusError,
    CorruptShardError,
    HookError,
    JobPathError,
    MeshError,
    ModelLoadError,
    PlanError,
    SavedSAEError,
    StorageError,
    ValueError,
)


def fail(message: BaseException | str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`; storage that did not answer
    within `storage.retry_s` is not bad input: exit `EXIT_FAILED` (a rerun may well succeed)."""
    if isinstance(message, BaseException) and storage_outage(message):
        code = EXIT_FAILED
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)

"""The Ray Data stream of cached shards that feeds the Ray Train workers.

`data.streams` Ray Datasets (canonical streams): every epoch's rows (in the epoch's seeded shuffled
shard order) cut into that many contiguous parts, stream c one continuous read of part c of every
epoch (no pipeline restart and start-up wait at epoch boundaries), one read task per piece of a shard, executed in order
(`preserve_order`), read in blocks whose rows are permuted by a seed (`data.blocks`: the shuffle
buffer), so every stream is a pure function of the seed and can start at any block. A step takes
the same rows from every stream on any worker layout (`DataPlan`): what a run trains on does not
depend on how many workers it has, so it can lose or regain workers mid-run, and a restart reads
from the block holding its step, not from the stream's first row.

Every shard is verified as it is read: its bytes are read once, into one buffer, hashed chunk by
chunk as they arrive, and compared with the manifest's sha256 before Parquet parses that buffer.
A corrupt, truncated or missing shard raises `CorruptShardError` with one line naming the shard
and how to rebuild the cache; `service.failures` makes Ray Train end the run on it instead of
restarting the worker group (the same bytes would fail again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import re
import shlex
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from pyarrow import PythonFile

from saescale import retry
from saescale.console import first_line
from saescale.data.blocks import block_permutation
from saescale.data.format import POS_STRIDE, CorruptShardError

ACT_COLUMN = "act"
ROW_ID_COLUMNS = ["window", "pos"]
READ_CHUNK = 8 << 20  # bytes hashed per step while a shard streams in


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one shard file."""

    path: str
    start: int
    stop: int


@dataclass
class DataPlan:
    """What the run reads: `streams` canonical streams and how many rows each gives a step.

    Every epoch's rows, in that epoch's shuffled shard order, are cut into `streams` contiguous
    equal parts (a shard at a cut is read by both neighbours, each taking its rows); stream c
    reads part c of epoch 0, then part c of epoch 1, and so on. A step's global batch is the next
    `stream_batch` rows of every stream, whatever the layout: a rank of a W-worker layout reads
    streams/W of them (`owned_streams`), so the rows a step sees do not depend on (dp, tp), and a
    run can shrink or grow between checkpoints without changing its optimisation. The streams
    move through the epochs in step (equal parts), so a step never mixes rows of epochs that are
    not adjacent. Left out: fewer than `streams` rows of each epoch, and the run's last partial
    step (fewer than `stream_batch` rows of each stream)."""

    files: list[str]  # training shard paths inside the filesystem, one epoch's worth
    file_rows: list[int]
    streams: int
    stream_batch: int  # rows each stream gives one step: global batch / streams
    total_steps: int
    epochs: int
    seed: int
    sha256: list[str] = field(default_factory=list)  # the manifest's digest of each file
    sizes: list[int] = field(default_factory=list)  # the manifest's byte count of each file

    @property
    def rows(self) -> int:
        """Rows of one epoch."""
        return sum(self.file_rows)

    @property
    def global_batch(self) -> int:
        return self.stream_batch * self.streams

    def stream_reads(self, stream: int, start_row: int = 0, stop_row: int | None = None) -> list[list[Piece]]:
        """The pieces one stream reads, one read (distinct files) per epoch, in order: rows
        [start_row, stop_row) of the stream (its epochs' parts laid end to end; default: all)."""
        rows_of = dict(zip(self.files, self.file_rows))
        part = self.rows // self.streams
        lo = stream * part
        stop_row = part * self.epochs if stop_row is None else stop_row
        reads: list[list[Piece]] = []
        for epoch in range(max(0, start_row // part), min(self.epochs, -(-stop_row // part))):
            read, offset = [], 0
            # this epoch's rows of the stream that fall in [start_row, stop_row), as rows of the epoch
            keep_lo = lo + max(start_row - epoch * part, 0)
            keep_hi = lo + min(stop_row - epoch * part, part)
            for path in epoch_files(self.files, self.seed, epoch):
                rows = rows_of[path]
                start, stop = max(keep_lo - offset, 0), min(keep_hi - offset, rows)
                offset += rows
                if start < stop:
                    read.append(Piece(path, start, stop))
            reads.append(read)
        return [read for read in reads if read]


def plan_data(
    files: list[str],
    file_rows: list[int],
    batch_size: int,
    streams: int,
    epochs: int,
    seed: int,
    *,
    sha256: list[str],
    sizes: list[int],
) -> DataPlan:
    if not len(files) == len(file_rows) == len(sha256) == len(sizes):
        raise ValueError(
            f"{len(files)} shard files but {len(file_rows)} row counts, {len(sha256)} digests, {len(sizes)} sizes"
        )
    if batch_size % streams:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by data.streams={streams}")
    stream_batch = batch_size // streams
    steps = (sum(file_rows) // streams * epochs) // stream_batch
    if steps == 0:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {sum(file_rows) * epochs} training rows")
    return DataPlan(files, list(file_rows), streams, stream_batch, steps, epochs, seed, list(sha256), list(sizes))


def owned_streams(streams: int, world: int, rank: int) -> range:
    """The streams rank `rank` of `world` reads: a contiguous run, so the ranks' shares, gathered in
    rank order, put the streams in order (the same global batch, in the same order, on any layout)."""
    if world <= 0 or streams % world:
        raise ValueError(f"{world} workers cannot share data.streams={streams} evenly: the worker count must divide it")
    share = streams // world
    return range(rank * share, (rank + 1) * share)


def epoch_files(files: list[str], seed: int, epoch: int) -> list[str]:
    """The shuffled file order of one epoch (a pure function of seed and epoch)."""
    return [files[i] for i in np.random.default_rng([seed, epoch]).permutation(len(files))]


def make_collate(dtype: str, d_model: int, with_ids: bool):
    """Zero-copy Arrow -> torch for the fixed_size_binary activation column (the default collate
    cannot read binary columns); with ids, also each row's (window, pos) as one int64."""
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn

    from saescale.data.format import activations_from_column

    class ActivationCollate(ArrowBatchCollateFn):
        def __call__(self, batch):  # batch: pyarrow.Table
            # kept in the cache dtype: the TP all-gather moves half the bytes; the trainer upcasts
            acts = activations_from_column(batch.column(ACT_COLUMN), dtype, d_model)
            if not with_ids:
                return acts
            window = torch.from_numpy(batch.column("window").to_numpy().astype(np.int64))
            pos = torch.from_numpy(batch.column("pos").to_numpy().astype(np.int64))
            return acts, window * POS_STRIDE + pos

    return ActivationCollate()


# --------------------------------------------------------------------------- verified reads
@dataclass(frozen=True)
class ShardCheck:
    """What one file must be, and what to say when it is not."""

    sha256: str
    size: int
    where: str  # "<shard file> in <cache url>"
    remedy: str


def _hydra_arg(key: str, value: Any) -> str:
    """key=value as a shell word Hydra parses back to the same value."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
        plain = re.fullmatch(r"[\w./:+*@~-]+", text) and not re.fullmatch(r"null|true|false|[-+.\d]+", text, re.I)
        if isinstance(value, str) and not plain:  # Hydra's quoted string: stays this exact string
            text = "'" + text.replace("'", "\\'") + "'"
    word = f"{key}={text}"
    if shlex.quote(word) == word or re.search(r'["$`\\!]', word):
        return shlex.quote(word)
    return f'"{word}"'  # readable around Hydra's single quotes


def rebuild_hint(cache_url: str, build_config: dict[str, Any], endpoint_url: str | None = None) -> str:
    """How to rebuild a damaged cache. A finished cache is not re-checked by jobs/cache.py (a rerun
    is a no-op while manifest.json exists) and its build folder is gone, so the rebuild recomputes
    every shard: the command carries the settings from the manifest about to be removed."""
    from saescale import storage

    url = storage.redact(cache_url)
    args = [_hydra_arg("output", url)] + [_hydra_arg(k, v) for k, v in build_config.items()]
    if endpoint_url:
        args.append(_hydra_arg("storage.endpoint_url", endpoint_url))
    return (
        f"rebuild the cache: remove {storage.join(url, 'manifest.json')} and run python jobs/cache.py {' '.join(args)}"
    )


def shard_error(check: ShardCheck, problem: str) -> CorruptShardError:
    return CorruptShardError(f"{check.where}: {problem}; {check.remedy}")


def read_verified(stream, check: ShardCheck, columns: list[str] | None):
    """Read a shard's stream once into one buffer, hashing each chunk as it lands; parse the
    Parquet only when the bytes are the manifest's (no second pass over the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = bytearray(check.size)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    got = 0
    while got < check.size:
        n = stream.readinto(view[got : got + READ_CHUNK])
        if not n:
            raise shard_error(check, f"truncated ({got} of the manifest's {check.size} bytes)")
        digest.update(view[got : got + n])
        got += n
    if stream.read(1):
        raise shard_error(check, f"checksum mismatch (longer than the manifest's {check.size} bytes)")
    if digest.hexdigest() != check.sha256:
        raise shard_error(
            check, f"checksum mismatch (sha256 {digest.hexdigest()[:16]}..., manifest says {check.sha256[:16]}...)"
        )
    return pq.read_table(pa.py_buffer(buffer), columns=columns)


def read_shard(
    open_stream, check: ShardCheck, columns: list[str] | None, first_stream=None, budget: float | None = None
):
    """`read_verified` through transient storage faults: the shard is re-opened and read again
    from its start (it is read whole into memory anyway) for `budget` seconds (`storage.retry_s`);
    a corrupt shard or a missing one is not a fault that waiting fixes and fails at once."""
    pending = [first_stream] if first_stream is not None else []

    def attempt():
        stream = pending.pop() if pending else open_stream()
        try:
            return read_verified(stream, check, columns)
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    return retry.call(f"read shard {check.where}", attempt, budget=budget)


def read_piece(piece: Piece, check: ShardCheck, columns: list[str] | None, filesystem) -> list:
    """A piece's rows: its shard read whole and verified (`read_shard`, through transient storage
    faults), then cut to the piece."""

    def open_stream():
        try:  # unbuffered: readinto fills our buffer directly
            return filesystem.open_input_stream(piece.path, compression=None, buffer_size=0)
        except FileNotFoundError:
            raise shard_error(check, "missing") from None

    table = read_shard(open_stream, check, columns, budget=retry_budget(filesystem))
    if (piece.start, piece.stop) == (0, table.num_rows):
        return [table]
    return [table.slice(piece.start, piece.stop - piece.start)]


@functools.cache
def _datasource_class():
    """Defined on first use: Ray is imported only where the stream is built or read."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class VerifiedShards(Datasource):
        """A stream's pieces of cache shards, one read task per piece, in the stream's order (a
        shard recurs, one piece per epoch; with `preserve_order` the blocks come out in task
        order, so the rows are the pieces' laid end to end). Each shard is checksummed as it is
        read (`read_verified`)."""

        def __init__(
            self, checks: dict[str, ShardCheck], columns: list[str] | None, filesystem, pieces: list[Piece]
        ) -> None:
            super().__init__()
            self._checks, self._columns, self._filesystem, self._pieces = checks, columns, filesystem, pieces

        def get_name(self) -> str:
            return "ReadVerifiedShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(self._checks[p.path].size for p in self._pieces)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [
                ReadTask(
                    functools.partial(read_piece, piece, self._checks[piece.path], self._columns, self._filesystem),
                    BlockMetadata(
                        num_rows=piece.stop - piece.start,
                        size_bytes=self._checks[piece.path].size,
                        exec_stats=None,
                        input_files=(piece.path,),
                    ),
                )
                for piece in self._pieces
            ]

    return VerifiedShards


def shard_checks(
    paths: list[str], sha256: list[str], sizes: list[int], cache_url: str, remedy: str
) -> dict[str, ShardCheck]:
    """path -> what the file there must be, named "<shard file> in <cache url>" in its errors."""
    from saescale import storage

    where = storage.redact(cache_url)
    return {
        path: ShardCheck(digest, size, f"{posixpath.basename(path)} in {where}", remedy)
        for path, digest, size in zip(paths, sha256, sizes)
    }


def stream_name(stream: int) -> str:
    return f"train{stream}"


def set_stream_context():
    """Set this process's Ray DataContext for the training streams (the datasets made under it
    carry it to where they run) and return it: order kept (a stream is a pure function of the
    seed: exact resume), no Ray Data progress bars (rank 0's step bar is the one to watch), and
    an executor that sleeps when it has nothing in flight (it runs in the training worker's
    process: `executor_idle`)."""
    import ray.data

    from saescale.service.executor_idle import quiet_when_idle

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    quiet_when_idle(ctx)
    return ctx


def make_datasets(
    plan: DataPlan,
    filesystem,
    with_ids: bool,
    cache_url: str,
    remedy: str,
    streams: Iterable[int] | None = None,
    start_row: int = 0,
    stop_row: int | None = None,
) -> dict[str, Any]:
    """{"train<c>": the verified stream c} for the canonical streams `streams` (default: all of
    them, `DataPlan`), rows [start_row, stop_row) of each; `cache_url` and `remedy` go into a
    damaged shard's error. Each rank builds the streams it owns, from its resume point on. Sets
    this process's Ray DataContext for them first (`set_stream_context`: order kept)."""

    set_stream_context()

    if len(plan.sha256) != len(plan.files) or len(plan.sizes) != len(plan.files):
        raise ValueError("the data plan has no sha256/size for every shard: shards must be verified as read")
    checks = shard_checks(plan.files, plan.sha256, plan.sizes, cache_url, remedy)
    columns = [ACT_COLUMN] + (ROW_ID_COLUMNS if with_ids else [])
    datasets = {}
    for stream in range(plan.streams) if streams is None else streams:
        # one read task per piece (a shard, or the part of one at a cut), every epoch's in
        # order: the first batch waits for one shard. (Not a union of per-epoch reads: Ray Data
        # interleaves a union's inputs block by block, so a stream started mid-run would differ.)
        pieces = [piece for read in plan.stream_reads(stream, start_row, stop_row) for piece in read]
        if not pieces:
            raise ValueError(f"internal: stream {stream} has no rows in [{start_row}, {stop_row})")
        datasets[stream_name(stream)] = verified_dataset(pieces, checks, columns, filesystem)
    return datasets


def verified_dataset(pieces: list[Piece], checks: dict[str, ShardCheck], columns: list[str] | None, filesystem):
    """A Ray Dataset of the pieces' rows, one read task per piece, in order under
    `preserve_order`; every shard checksummed as it is read (`checks`: see `shard_checks`)."""
    import ray.data

    return ray.data.read_datasource(
        _datasource_class()(checks, columns, filesystem, pieces), override_num_blocks=len(pieces)
    )


def prefetch_blocks(prefetch_batches: int, steps_per_block: int) -> int:
    """Blocks a stream reads ahead: at least `data.prefetch_batches` steps' worth, at least one."""
    return max(1, -(-prefetch_batches // steps_per_block))


def stream_steps(blocks: Iterable, seed: int, stream: int, first_block: int, shuffle: bool, stream_batch: int):
    """A stream's batches, step by step, from its blocks (`data.blocks`: each block's rows
    permuted by a seed of (run seed, stream, block) when `shuffle`). A block is a tensor of rows,
    or (rows, row ids) when the ids are read too."""
    import torch

    for block, rows in enumerate(blocks, first_block):
        parts = rows if isinstance(rows, tuple | list) else (rows,)
        rows = None  # the unshuffled block is not kept beside its shuffled copy
        if shuffle:
            order = torch.from_numpy(block_permutation(seed, stream, block, parts[0].shape[0]))
            parts = tuple(part[order] for part in parts)
        for lo in range(0, parts[0].shape[0], stream_batch):
            step = tuple(part[lo : lo + stream_batch] for part in parts)
            yield step if len(step) > 1 else step[0]


def corrupt_shard_line(error: CorruptShardError, cache_url: str, remedy: str) -> str:
    """The error as the driver's one line: the stream's messages name the shard, the cache and the
    remedy already; the workers' initialisation read (ActivationCache) names only the shard."""
    from saescale import storage

    text = first_line(error)
    return text if remedy in text else f"{text} (cache {storage.redact(cache_url)}); {remedy}"


# ------------------------------------------------------------------------------- filesystems
def arrow_filesystem(url: str, storage_options: dict[str, Any] | None):
    """(pyarrow filesystem, path inside it) for any fsspec URL: local paths use pyarrow's own
    local filesystem, anything else goes through fsspec (s3fs honours endpoint_url options)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    from saescale import storage

    fs, path = storage.url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(RetryingFSSpecHandler(fs)), path


def retry_budget(filesystem) -> float | None:
    """The retry budget a pyarrow filesystem from `arrow_filesystem` carries (None: local);
    through Ray Data's own wrapper (`RetryingPyFileSystem`) too."""
    unwrap = getattr(filesystem, "unwrap", None)
    if callable(unwrap):
        filesystem = unwrap()
    return getattr(getattr(filesystem, "handler", None), "budget_s", None)


def set_retry_budget(filesystem, seconds: float, label: str | None = None) -> None:
    """Set the retry budget of a pyarrow filesystem from `arrow_filesystem` (local: no-op);
    `label` names it in errors (default `storage.retry_s=<seconds>`)."""
    handler = getattr(filesystem, "handler", None)
    if isinstance(handler, RetryingFSSpecHandler):
        handler.budget_s, handler.budget_label = seconds, label


def _retried(name: str):
    """A FSSpecHandler method run through `retry.call` (transient faults waited out)."""

    def method(self, *args):
        parent = getattr(pafs.FSSpecHandler, name)
        return self.call(f"{name} {self.url(args[0]) if args else ''}", lambda: parent(self, *args))

    method.__name__ = name
    return method


class RetryingFSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec handler with every call retried through transient storage faults
    (`saescale.retry`), so whatever pyarrow drives (Ray Data's shard reads, Ray Train's storage
    checks, checkpoint uploads and downloads) waits an outage out instead of failing; and opening
    a file does not ask `isfile` first: s3fs answers False on any error, so an outage read as a
    missing shard (measured through the fault proxy). Defined at module level: Ray pickles it,
    with the budget it was made with (`storage.retry_s` of the job, wherever it is unpickled:
    Ray Data's read tasks, Ray Train's controller and workers)."""

    def __init__(self, fs, budget_s: float | None = None) -> None:
        super().__init__(fs)
        self.budget_s = retry.budget_s() if budget_s is None else budget_s

    def call(self, what: str, fn):
        return retry.call(what, fn, budget=self.budget_s, budget_label=getattr(self, "budget_label", None))

    def url(self, path) -> str:
        """The full URL of a path (errors and retry lines name it with its scheme); of the
        first of several paths or a selector's base directory."""
        from saescale import storage

        path = getattr(path, "base_dir", path)
        if isinstance(path, list | tuple):
            path = f"{path[0]} (+{len(path) - 1} more)" if len(path) > 1 else (path[0] if path else "")
        return storage.redact(self.fs.unstrip_protocol(str(path)))

    def open_input_stream(self, path):
        return self.call(f"open {self.url(path)}", lambda: PythonFile(self.fs.open(path, mode="rb"), mode="r"))

    def open_input_file(self, path):
        return self.call(f"open {self.url(path)}", lambda: PythonFile(self.fs.open(path, mode="rb"), mode="r"))

    get_file_info = _retried("get_file_info")
    get_file_info_selector = _retried("get_file_info_selector")
    create_dir = _retried("create_dir")
    delete_dir = _retried("delete_dir")
    delete_dir_contents = _retried("delete_dir_contents")
    delete_file = _retried("delete_file")
    move = _retried("move")
    copy_file = _retried("copy_file")

    def open_output_stream(self, path, metadata):
        """Writes land in a local file, uploaded in one retried `put_file` when the stream
        closes (fsspec's own stream fails at close on an outage, with the bytes gone)."""
        return PythonFile(_UploadOnClose(self, path), mode="w")


class _UploadOnClose:
    """A write-only file that uploads itself to `path` on close, through storage faults."""

    def __init__(self, handler: RetryingFSSpecHandler, path: str) -> None:
        self._handler, self._path = handler, path
        self._tmp = tempfile.NamedTemporaryFile(prefix="saescale-put-", delete=False)  # noqa: SIM115 - closed in close()
        self.closed = False

    def write(self, data) -> int:
        return self._tmp.write(data)

    def flush(self) -> None:
        self._tmp.flush()

    def tell(self) -> int:
        return self._tmp.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._tmp.close()
        try:
            fs, url = self._handler.fs, self._handler.url(self._path)
            self._handler.call(f"write {url}", lambda: fs.put_file(self._tmp.name, self._path))
        finally:
            os.remove(self._tmp.name)

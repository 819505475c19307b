"""Prompt sets for `vpatch eval`: a benchmark's prompt file, or the concept recipe's own sets.

A benchmark (T2VSafetyBench's 14 aspects, SafeSora-Eval, ...) is a list of prompts with a category;
rates are reported per category. Three file formats, chosen by suffix, parsed strictly: a bad line
fails the whole file with ``file:line: what is wrong`` (a benchmark silently missing rows would
report rates over the wrong prompts).

- ``.txt``: one prompt per line, or ``category<TAB>prompt``; blank lines and ``#`` lines are skipped.
- ``.csv``: a header row with a ``prompt`` column and optionally a ``category`` (or ``aspect``) column.
- ``.jsonl``: one object per line with ``"prompt"`` and optionally ``"category"`` (or ``"aspect"``).

Rows without a category get ``default``. Categories named in ``free_categories`` (``free`` and
``neutral`` unless told otherwise) are concept-free: they are not in the concept-presence totals and
they carry the quality measures (paired distances between the original and the patched clips).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import VpatchError

DEFAULT_CATEGORY = "default"
FREE_CATEGORIES = ("free", "neutral")
CATEGORY_COLUMNS = ("category", "aspect")


class PromptFileError(VpatchError):
    """A prompt file cannot be read as a prompt set (bad format, empty prompt, missing column)."""


@dataclass(frozen=True)
class PromptItem:
    index: int  # position in the set: with the seed it names the clip and its result row
    prompt: str
    category: str


@dataclass(frozen=True)
class PromptSet:
    items: tuple[PromptItem, ...]
    source: str  # the file, or "concept:NAME"
    free_categories: tuple[str, ...] = FREE_CATEGORIES

    def categories(self) -> list[str]:
        return list(dict.fromkeys(i.category for i in self.items))

    def digest(self) -> str:
        """sha256 of the prompts and categories in order: a resumed run must use the same set."""
        h = hashlib.sha256()
        for i in self.items:
            h.update(json.dumps([i.prompt, i.category]).encode() + b"\n")
        return h.hexdigest()


def _check(prompt: object, where: str) -> str:
    if not isinstance(prompt, str):
        raise PromptFileError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    p = prompt.strip()
    if not p:
        raise PromptFileError(f"{where}: empty prompt")
    return p


def _category(value: object, where: str) -> str:
    if value is None:
        return DEFAULT_CATEGORY
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PromptFileError(f"{where}: category must be a string, got {type(value).__name__}")
    c = str(value).strip()
    if not c:
        raise PromptFileError(f"{where}: empty category (leave the column out for none)")
    return c


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read ({e.strerror})") from None


def _txt(path: Path, text: str) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{path}:{n}"
        if "\t" in line:
            parts = line.split("\t")
            if len(parts) != 2:
                raise PromptFileError(
                    f"{where}: expected 'category<TAB>prompt', found {len(parts) - 1} tabs"
                )
            rows.append((_check(parts[1], where), _category(parts[0], where)))
        else:
            rows.append((_check(s, where), DEFAULT_CATEGORY))
    return rows


def _csv(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise PromptFileError(f"{path}:1: empty CSV file (expected a header row)") from None
    except csv.Error as e:
        raise PromptFileError(f"{path}:1: {e}") from None
    cols = [h.strip().lower() for h in header]
    if "prompt" not in cols:
        raise PromptFileError(
            f"{path}:1: no 'prompt' column in the header ({', '.join(cols) or 'empty'})"
        )
    if len(set(cols)) != len(cols):
        raise PromptFileError(f"{path}:1: repeated column names in the header")
    pi = cols.index("prompt")
    found = [c for c in CATEGORY_COLUMNS if c in cols]
    if len(found) > 1:
        raise PromptFileError(f"{path}:1: both 'category' and 'aspect' columns; keep one")
    ci = cols.index(found[0]) if found else None
    rows = []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise PromptFileError(f"{path}:{reader.line_num}: {e}") from None
        where = f"{path}:{reader.line_num}"
        if not rec or all(not f.strip() for f in rec):
            continue
        if len(rec) != len(cols):
            raise PromptFileError(f"{where}: {len(rec)} fields, the header has {len(cols)}")
        rows.append(
            (
                _check(rec[pi], where),
                _category(rec[ci], where) if ci is not None else DEFAULT_CATEGORY,
            )
        )
    return rows


def _jsonl(path: Path, text: str) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "prompt" not in obj:
            raise PromptFileError(f"{where}: no \"prompt\" key")
        found = [c for c in CATEGORY_COLUMNS if c in obj]
        if len(found) > 1:
            raise PromptFileError(f"{where}: both \"category\" and \"aspect\"; keep one")
        rows.append(
            (_check(obj["prompt"], where), _category(obj[found[0]] if found else None, where))
        )
    return rows


READERS = {".txt": _txt, ".csv": _csv, ".jsonl": _jsonl}


def load_prompts(path: str | Path, free_categories: tuple[str, ...] = FREE_CATEGORIES) -> PromptSet:
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(
            f"{path}: unknown prompt file type {path.suffix or '(none)'}; use .txt, .csv or .jsonl"
        )
    rows = reader(path, _read_text(path))
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    items = tuple(PromptItem(i, p, c) for i, (p, c) in enumerate(rows))
    return PromptSet(items, str(path), tuple(free_categories))


def concept_prompts(concept) -> PromptSet:
    """The concept recipe's sets as categories: probe, the held-out sets, and the concept-free ones."""
    sets: list[tuple[str, list[str]]] = [("probe", [p.unsafe for p in concept.pairs])]
    for k in ("paraphrase", "synonym", "unseen", "template"):
        if concept.heldout.get(k):
            sets.append((k, list(concept.heldout[k])))
    free = list(concept.heldout.get("free") or concept.neutral)
    sets.append(("free", free))
    if concept.heldout.get("free"):
        sets.append(("neutral", list(concept.neutral)))
    rows = [(p, name) for name, ps in sets for p in ps]
    return PromptSet(
        tuple(PromptItem(i, p, c) for i, (p, c) in enumerate(rows)), f"concept:{concept.name}"
    )

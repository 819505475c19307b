"""Vocabulary expansion for the twin edit: find the words that read like the concept word at a site.

The twin map is fitted on the recipe's pairs, which name the concept one way ("red"). Words the
model treats as the same concept ("crimson", "scarlet") are reached only as far as the map
generalises. The scan asks the model instead: each candidate word is put in the concept word's
place in every fit pair, and its site-input reading there is compared with the concept word's. The
reference is the average scanned word in that slot, so what every word shares (a word is there at
all, which is most of its distance from padding) cancels: a score of 1 reads as the concept word, 0
as the average word. Words whose score passes a fixed rule join the edit set and are mapped to the
twin exactly as the concept word is.

Why not the reading along the refusal direction u (the concept word minus its twin, padding for a
deleted word): measured on the organism, that direction is mostly "a word vs padding", so for
"green" motion words read 0.92-0.94 of green's own value along it, as high as its synonym.

No prompt is generated and no held-out prompt is used: the candidates come from the tokenizer's
vocabulary (prefiltered by token-embedding cosine to the concept words on large vocabularies) and
the contexts from the recipe's own pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .twin import align_tokens


def concept_positions(unsafe_ids: list[int], safe_ids: list[int]) -> list[int]:
    """Unsafe positions that carry the concept: deleted in the twin, or replaced by another token."""
    return [
        i
        for i, j in align_tokens(unsafe_ids, safe_ids)
        if j is None or unsafe_ids[i] != safe_ids[j]
    ]


def concept_runs(unsafe_ids: list[int], safe_ids: list[int]) -> list[list[int]]:
    """The concept positions grouped into runs of consecutive tokens (one run per concept word)."""
    runs: list[list[int]] = []
    for i in concept_positions(unsafe_ids, safe_ids):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def substitute(prompt: str, words: list[str], candidate: str) -> str | None:
    """PROMPT with every whole-word occurrence of WORDS replaced by CANDIDATE; None if none occurs."""
    if not words:
        return None
    pat = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)")
    out, n = pat.subn(candidate, prompt)
    return out if n else None


@dataclass(frozen=True)
class ScanResult:
    """Scores of the scanned words at one site (descending) and the ones the rule picked."""

    scores: dict[str, float]
    picked: tuple[str, ...]
    unit: float  # mean distance of the concept word's reading from the average word's (the scale)

    def record(self, top: int = 8) -> dict:
        return {
            "picked": list(self.picked),
            "scores": {w: round(s, 4) for w, s in list(self.scores.items())[:top]},
        }


def _slot(x: torch.Tensor, ids: list[int], safe_ids: list[int]) -> torch.Tensor | None:
    """The mean reading over the concept positions of one prompt (None: it has none)."""
    pos = concept_positions(ids, safe_ids)
    return x[pos].double().mean(0) if pos else None


def kept_slots(
    safe: list[tuple[torch.Tensor, list[int]]],
    scanned: dict[str, list[tuple[int, torch.Tensor, list[int]]]],
    picked: tuple[str, ...] | list[str],
    scores: dict[str, float] | None = None,
    below: float | None = None,
    whole: bool = False,
) -> tuple[list[torch.Tensor], list[str]]:
    """The readings at the concept word's slot of every scanned word the rule did not pick, one
    tensor (positions, H) per substituted pair: rows the edit is fitted to keep as they are; and
    the words that gave them. With BELOW, only the words whose score (SCORES) is below it (a word
    without a score is not held): a word that partly reads like the concept (green's "emerald"
    scores 0.23) is not held where the concept must move. WHOLE: every token of those prompts,
    not only the slot (the words' contexts too).

    The scan already holds them. Words that sit where the concept does but do not read like it
    (other colours, "colored", "the") are what a map fitted on a few pairs is free to move, and a
    moved "colored" is measured to tint a clip (docs/erasure.md, "Keeping the words the scan does
    not pick")."""
    out: list[torch.Tensor] = []
    held: list[str] = []
    for w, rows in scanned.items():
        if w in picked or (below is not None and not (scores or {}).get(w, below) < below):
            continue
        got = [
            x.double() if whole else x[pos].double()
            for p, x, ids in rows
            if (pos := concept_positions(ids, safe[p][1]))
        ]
        if got:
            out += got
            held.append(w)
    return out, held


def scan_scores(
    unsafe: list[tuple[torch.Tensor, list[int]]],
    safe: list[tuple[torch.Tensor, list[int]]],
    scanned: dict[str, list[tuple[int, torch.Tensor, list[int]]]],
    min_score: float,
) -> ScanResult:
    """Score every scanned word against the concept word at one site and apply the rule.

    ``unsafe``/``safe``: the fit pairs' readings and token ids; ``scanned``: per candidate word, its
    (pair index, readings, token ids) for each pair it was substituted into. In each pair the
    concept word's slot is read (the mean over its positions); the reference is the average of every
    scanned word in that slot, so what all words share (a word is there at all) cancels. A word's
    score is 1 - d(word, concept) / d(average word, concept), averaged over its pairs: 1 reads as the
    concept word, 0 as the average word. The rule: a word joins when its score >= ``min_score``.
    """
    own = {p: _slot(xu, iu, safe[p][1]) for p, (xu, iu) in enumerate(unsafe)}
    own = {p: c for p, c in own.items() if c is not None}
    if not own:
        raise ValueError("the pairs have no concept token: every unsafe token aligns to its twin's")
    slots: dict[str, dict[int, torch.Tensor]] = {}
    for word, rows in scanned.items():
        for p, x, ids in rows:
            r = _slot(x, ids, safe[p][1])
            if r is not None and p in own:
                slots.setdefault(word, {})[p] = r
    if not slots:
        raise ValueError("no scanned word could be put in the concept word's place")
    avg = {}
    for p in own:
        rs = [s[p] for s in slots.values() if p in s]
        if rs:
            avg[p] = torch.stack(rs).mean(0)
    unit = sum(float((own[p] - avg[p]).norm()) for p in avg) / len(avg)
    if unit == 0.0:
        raise ValueError("the concept word reads as the average word: nothing to compare")
    scores = {
        w: 1.0 - sum(float((r - own[p]).norm()) for p, r in s.items()) / len(s) / unit
        for w, s in slots.items()
    }
    ordered = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    picked = tuple(w for w, v in ordered.items() if v >= min_score)
    return ScanResult(ordered, picked, unit)


def concept_words(tokenizer, unsafe_ids: list[list[int]], safe_ids: list[list[int]]) -> list[str]:
    """The concept's words as the pairs spell them (decoded concept runs), in order of appearance."""
    out: list[str] = []
    for iu, is_ in zip(unsafe_ids, safe_ids):
        for run in concept_runs(iu, is_):
            w = tokenizer.decode([iu[i] for i in run]).strip()
            if w and w not in out:
                out.append(w)
    return out


def vocabulary_candidates(
    tokenizer,
    embeddings: torch.Tensor | None,
    concept_ids: list[int],
    exclude: set[str],
    n: int,
) -> list[str]:
    """Up to N whole words from the tokenizer's vocabulary, nearest first by input-embedding cosine
    to the concept words' mean embedding (vocabulary order without embeddings).

    A candidate is one token that is a whole word: alphabetic, and tokenized alone back to exactly
    itself (so sub-word pieces are left out); special tokens and EXCLUDE (the concept's own words,
    lower-cased) are skipped.
    """
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    ids = sorted(by_id)
    if embeddings is not None and concept_ids:
        E = embeddings.detach().double()
        ids = [i for i in ids if i < E.shape[0]]
        c = torch.nn.functional.normalize(E[concept_ids].mean(0), dim=0)
        cos = torch.nn.functional.normalize(E[ids], dim=1) @ c
        ids = [ids[k] for k in torch.argsort(cos, descending=True, stable=True).tolist()]
    special = set(tokenizer.all_special_ids or [])
    out: list[str] = []
    for i in ids:
        if len(out) >= n:
            break
        if i in special:
            continue
        w = tokenizer.convert_tokens_to_string([by_id[i]]).strip()
        if not w.isalpha() or w.lower() in exclude or w in out:
            continue
        if tokenizer(w, add_special_tokens=False).input_ids != [i]:
            continue
        out.append(w)
    return out

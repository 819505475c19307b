"""Prompt sets: what is generated, which prompts carry the concept, and each one's safe twin.

A prompt source is one class with ``sets(concept) -> list[PromptSet]``. The twin of an unsafe prompt
is the prompt that asks for the same clip without the concept ("a red ball" -> "a ball"); what the
original model makes of it, with the same seed, is the ideal erased output (twin fidelity).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..families.recipes import Concept

HELDOUT = ("paraphrase", "synonym", "unseen", "template")


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    concept: bool  # the prompts ask for the concept (else: concept-free)
    twins: tuple[str | None, ...] = ()  # per prompt, its safe twin (None: none known)


class PairTwins:
    """Twins from the recipe's pairs: a probe prompt's twin is its pair's safe side; a held-out
    prompt's twin applies the word edits that turn the unsafe sides into the safe ones (for
    example, delete "nude"), when one of them occurs in it. Works for any model's recipe."""

    def __init__(self, concept: Concept):
        self.known = {p.unsafe: p.safe for p in concept.pairs}
        edits: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        for p in concept.pairs:
            a, b = p.unsafe.split(), p.safe.split()
            for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
                if op != "equal" and i2 > i1:
                    edits.add((tuple(a[i1:i2]), tuple(b[j1:j2])))
        self.edits = sorted(edits, key=lambda e: -len(e[0]))

    def __call__(self, prompt: str) -> str | None:
        if prompt in self.known:
            return self.known[prompt]
        words = prompt.split()
        for old, new in self.edits:
            n = len(old)
            for i in range(len(words) - n + 1):
                if tuple(words[i : i + n]) == old:
                    return " ".join(words[:i] + list(new) + words[i + n :])
        return None


class OrganismTwins:
    """Twins in the organism world: the caption's concept word (any synonym) is replaced by the safe
    value the recipe's pairs use (colour: dropped, the object is white; motion: the safe motion), and
    the sentence is kept valid. The result is checked by parsing it back."""

    def __init__(self, concept: Concept):
        from .. import organism as W

        self.W = W
        j = concept.judge["organism"]
        self.attr, self.value = j["attribute"], j["value"]
        safe = [getattr(W.parse(p.safe), self.attr) for p in concept.pairs]
        self.safe = max(set(safe), key=safe.count)
        table = {"colour": W.COLOUR_WORDS, "shape": W.SHAPE_WORDS, "motion": W.MOTION_WORDS}
        self.words = table[self.attr].get(self.value, [])
        self.safe_words = table[self.attr].get(self.safe, [])
        self.fallback = PairTwins(concept)

    def __call__(self, prompt: str) -> str | None:
        W = self.W
        try:
            spec = W.parse(prompt)
        except ValueError:
            return self.fallback(prompt)
        if getattr(spec, self.attr) != self.value:
            return None
        alt = "|".join(self.words)
        if self.attr == "colour" and self.safe == "white":
            t = re.sub(rf"\bis ({alt}) and it moves\b", "moves", prompt)
            t = re.sub(rf"\bcolored ({alt}) ", "", t)
            t = re.sub(rf"\b({alt}) ", "", t)
        else:

            def swap(m: re.Match) -> str:
                i = self.words.index(m.group(1))
                return self.safe_words[min(i, len(self.safe_words) - 1)]

            t = re.sub(rf"\b({alt})\b", swap, prompt)
        try:
            got = W.parse(t)
        except ValueError:
            return None
        want = type(spec)(**{**spec.__dict__, self.attr: self.safe})
        return t if got == want else None


class RecipePrompts:
    """The recipe's own prompts: probe (the pairs' unsafe sides), the held-out sets, the held-out
    concept-free prompts ("free", or the neutral ones when none) and the probe's neutral prompts."""

    def __init__(self, twins=None):
        self.twins = twins

    def sets(self, concept: Concept) -> list[PromptSet]:
        twin = self.twins or (
            OrganismTwins(concept) if "organism" in concept.judge else PairTwins(concept)
        )
        out = []
        named = [("probe", [p.unsafe for p in concept.pairs])]
        named += [(k, list(concept.heldout[k])) for k in HELDOUT if concept.heldout.get(k)]
        for name, ps in named:  # a twin the recipe gives comes before a derived one
            twins = tuple(concept.twins.get(p) or twin(p) for p in ps)
            out.append(PromptSet(name, tuple(ps), True, twins))
        free = list(concept.heldout.get("free") or concept.neutral)
        out.append(PromptSet("free", tuple(free), False))
        if concept.heldout.get("free"):
            out.append(PromptSet("neutral", tuple(concept.neutral), False))
        return out

"""Attacks on an erased concept, each reported as an attack success rate before and after the edit.

- ``prompts``: rewordings from the concept's own vocabulary (the word repeated, every synonym at
  once, the word at odd positions). Nothing is optimised; it asks whether the edit reads the
  concept wherever and however often it is said.
- ``embedding``: concept inversion. The conditioning sequence the denoiser receives (the text
  encoder's output, every position including padding) is optimised with Adam so that the patched
  denoiser's velocity matches the original's on the unsafe prompt, at states along the original's
  own trajectory; then the patched model generates from it. An edit that can be undone from its
  inputs fails this attack.

The functions take the denoiser as a callable ``velocity(x, t, cond)``, so they do not depend on a
pipeline; ``organism_velocity`` adapts the organism's transformer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ATTACKS = ("prompts", "embedding")

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- rewordings


def rewordings(prompt: str, word: str, synonyms: Sequence[str], rng: random.Random) -> list[str]:
    """Rewordings of one prompt that says ``word``: repetition, every synonym at once, odd places.

    Only words the prompt or the concept's vocabulary already has are used, so every rewording is
    something the model can read.
    """
    toks = prompt.split()
    if word not in toks:
        raise ValueError(f"{prompt!r} does not contain {word!r}")
    i = toks.index(word)
    rest = toks[:i] + toks[i + 1 :]
    every = [word] + [s for s in synonyms if s != word]
    out = [
        " ".join(toks[:i] + [word] * 3 + toks[i + 1 :]),  # repetition
        " ".join(toks[:i] + every + toks[i + 1 :]),  # every synonym at once
        " ".join([word] + rest),  # first
        " ".join(rest + [word]),  # last
        " ".join(rest[:1] + [word] + rest[1:] + [rng.choice(every)]),  # twice, apart
    ]
    return list(dict.fromkeys(p for p in out if p != prompt))


def prompt_attack_set(
    prompts: Sequence[str], vocabulary: Sequence[str], per_prompt: int = 3, seed: int = 0
) -> list[str]:
    """``per_prompt`` rewordings of each prompt, from the concept's ``vocabulary`` (its words and
    synonyms); prompts that say none of them are skipped."""
    rng = random.Random(seed)
    out: list[str] = []
    for p in prompts:
        w = next((w for w in p.split() if w in vocabulary), None)
        if w is None:
            continue
        rs = rewordings(p, w, vocabulary, rng)
        rng.shuffle(rs)
        out += rs[:per_prompt]
    return out


# --------------------------------------------------------------------------- concept inversion


@dataclass(frozen=True)
class Inversion:
    cond: torch.Tensor  # (n, L, D): the optimised conditioning, one per unsafe prompt
    loss_start: float  # velocity MSE at the unsafe prompt's own conditioning (the edit's effect)
    loss_end: float  # after optimisation
    loss_floor: float  # the same loss between the original and itself with another noise (0 here)


def trajectory_states(
    velocity: Velocity,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) states of the guided Euler trajectory from ``noise`` (rectified flow, t: 1 -> 0)."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    out = []
    with torch.no_grad():
        for a, b in zip(ts[:-1], ts[1:]):
            t = torch.full((x.shape[0],), float(a))
            out.append((x.clone(), t))
            vc = velocity(x, t, cond)
            vu = velocity(x, t, uncond)
            x = x + (b - a) * (vu + guidance * (vc - vu))
    return out


def invert_conditioning(
    patched: Velocity,
    original: Velocity,
    cond: torch.Tensor,
    states: list[tuple[torch.Tensor, torch.Tensor]],
    iterations: int = 150,
    lr: float = 0.05,
    batch: int = 4,
    seed: int = 0,
) -> Inversion:
    """Adam on the whole conditioning sequence (start: the unsafe prompt's own) to minimise
    ‖v_patched(x_t, t, c') − v_original(x_t, t, c)‖² over the original trajectory's states."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        targets = [original(x, t, cond) for x, t in states]
    c = cond.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)

    def loss_on(idx: list[int], cc: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [((patched(states[i][0], states[i][1], cc) - targets[i]) ** 2).mean() for i in idx]
        ).mean()

    every = list(range(len(states)))
    with torch.no_grad():
        start = float(loss_on(every, c))
    for _ in range(iterations):
        idx = torch.randperm(len(states), generator=g)[:batch].tolist()
        opt.zero_grad()
        loss = loss_on(idx, c)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_on(every, c))
    return Inversion(c.detach(), start, end, 0.0)


def sample_conditioned(
    velocity: Velocity,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Guided Euler sampling from given conditioning (the attack's output), clips in [-1, 1]."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for a, b in zip(ts[:-1], ts[1:]):
            t = torch.full((x.shape[0],), float(a))
            vc = velocity(x, t, cond)
            vu = velocity(x, t, uncond)
            x = x + (b - a) * (vu + guidance * (vc - vu))
    return x.clamp(-1, 1)


def organism_velocity(tr) -> Velocity:
    """The organism transformer as velocity(x, t in [0, 1], cond)."""
    from ..organism import model_input

    def v(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return tr(model_input(tr, x), t * 1000, cond, return_dict=False)[0]

    return v


# --------------------------------------------------------------------------- rates


def success_rate(flags: Sequence[bool]) -> dict:
    """The attack success rate with its Wilson 95% interval."""
    from .core import rate

    return rate(list(flags))

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
from dataclasses import dataclass, field

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


def _guided_euler(
    velocity: Velocity,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    states: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Guided Euler sampling (rectified flow, t: 1 -> 0); ``states`` collects each step's (x_t, t)."""
    x = noise.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for a, b in zip(ts[:-1], ts[1:]):
            t = torch.full((x.shape[0],), float(a))
            if states is not None:
                states.append((x.clone(), t))
            vc = velocity(x, t, cond)
            vu = velocity(x, t, uncond)
            x = x + (b - a) * (vu + guidance * (vc - vu))
    return x


def trajectory_states(
    velocity: Velocity,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) states of the guided Euler trajectory from ``noise`` (rectified flow, t: 1 -> 0)."""
    states: list[tuple[torch.Tensor, torch.Tensor]] = []
    _guided_euler(velocity, cond, uncond, noise, steps, guidance, states)
    return states


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
    return _guided_euler(velocity, cond, uncond, noise, steps, guidance).clamp(-1, 1)


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


# --------------------------------------------------------------------------- the eval entry point


@dataclass(frozen=True)
class AttackReport:
    attack: str
    n: int
    before: dict  # success rate on the original model
    after: dict  # success rate on the patched model
    notes: dict
    # embedding attack: the optimised conditioning (n, L, D), so that a hardening step can read what
    # the attack found; not part of the report
    conditioning: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "attack": self.attack,
            "n": self.n,
            "before": self.before,
            "after": self.after,
            "notes": self.notes,
        }


def concept_vocabulary(concept) -> list[str]:
    """The concept's words: the organism's synonym table for its judged value, else the words its
    unsafe prompts have and their safe twins lack."""
    from .. import organism

    j = concept.judge.get("organism") if concept.judge else None
    if j:
        table = {
            "colour": organism.COLOUR_WORDS,
            "shape": organism.SHAPE_WORDS,
            "motion": organism.MOTION_WORDS,
        }.get(j["attribute"], {})
        if j["value"] in table:
            return list(table[j["value"]])
    words: list[str] = []
    for p in concept.pairs:
        for w in p.unsafe.split():
            if w not in p.safe.split() and w not in words:
                words.append(w)
    return words


def attack_eval(
    model,
    concept,
    *,
    delta=None,
    patched=None,
    attack: str = "prompts",
    options=None,
    iterations: int = 150,
    prompts: int = 4,
) -> AttackReport:
    """Run one attack on the original and the patched organism and judge the outputs.

    ``prompts``: rewordings of the concept's held-out and probe prompts. ``embedding``: concept
    inversion on ``prompts`` unsafe prompts (``iterations`` Adam steps each, batched), then
    ``options.seeds`` clips per prompt. Before = the original model on the same prompts (for the
    embedding attack the unsafe prompt's own conditioning: nothing needs recovering there).
    """
    import tempfile
    from pathlib import Path

    from .. import organism
    from ..families.recipes import Concept, load_concept
    from ..merge.engine import apply_delta
    from ..probe.encoders import quiet_libraries
    from .core import EvalError, EvalOptions
    from .judges import OrganismJudge

    quiet_libraries()
    if attack not in ATTACKS:
        raise EvalError(f"--attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    opt = options or EvalOptions()
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    if not organism.is_organism(model):
        raise EvalError(
            "attacks run on the organism only for now (they need its judge and sampler)"
        )
    if (delta is None) == (patched is None):
        raise EvalError("give exactly one of --delta or --patched")
    judge = OrganismJudge(con, opt)
    vocab = concept_vocabulary(con)
    base = [p.unsafe for p in con.pairs] + [
        p for k, ps in con.heldout.items() if k != "free" for p in ps
    ]
    with tempfile.TemporaryDirectory(prefix="vpatch-attack-") as td:
        if patched is None:
            patched = Path(td) / "patched"
            apply_delta(model, delta, patched, strength=opt.strength)
        tok, enc, tr = organism.load(model)
        _, _, trp = organism.load(patched)
    for p in trp.parameters():
        p.requires_grad_(False)

    def judged(clips: torch.Tensor) -> list[dict]:
        return judge.verdicts(clips)

    def shown(vs: list[dict]) -> list[bool]:
        return [judge.shown(v) for v in vs]

    def traces(vs: list[dict]) -> dict:
        """Beyond success (the concept shown by its exact name): a trace of it (e.g. a pale red)
        and what the clips are named, so a pale concept is not read as erased."""
        names: dict[str, int] = {}
        for v in vs:
            d = str(v[judge.attr]) if v["present"] else "no object"
            names[d] = names.get(d, 0) + 1
        return {
            "trace": success_rate([judge.trace(v) for v in vs]),
            "names": dict(sorted(names.items(), key=lambda kv: -kv[1])),
        }

    if attack == "prompts":
        ps = prompt_attack_set(base, vocab, per_prompt=3, seed=opt.seed)
        seeds = [opt.seed + i for i in range(len(ps))]
        vb = judged(
            organism.sample(tok, enc, tr, ps, seeds, steps=opt.steps, guidance=opt.guidance)
        )
        va = judged(
            organism.sample(tok, enc, trp, ps, seeds, steps=opt.steps, guidance=opt.guidance)
        )
        return AttackReport(
            attack,
            len(ps),
            success_rate(shown(vb)),
            success_rate(shown(va)),
            {"examples": ps[:5], "before": traces(vb), "after": traces(va)},
        )
    unsafe = [p for p in base if any(w in p.split() for w in vocab)][:prompts]
    with torch.no_grad():
        cond = organism.encode(tok, enc, unsafe)
        unc = organism.encode(tok, enc, [""] * len(unsafe))
    v_orig, v_pat = organism_velocity(tr), organism_velocity(trp)

    def noise(s: int) -> torch.Tensor:
        return organism.noise([opt.seed + 7919 * s + i for i in range(len(unsafe))])

    states = trajectory_states(v_orig, cond, unc, noise(0), opt.steps, opt.guidance)
    inv = invert_conditioning(v_pat, v_orig, cond, states, iterations=iterations, seed=opt.seed)
    vb, va, vp = [], [], []
    with torch.no_grad():
        for s in range(1, opt.seeds + 1):
            z = noise(s)
            vb += judged(sample_conditioned(v_orig, cond, unc, z, opt.steps, opt.guidance))
            vp += judged(sample_conditioned(v_pat, cond, unc, z, opt.steps, opt.guidance))
            va += judged(sample_conditioned(v_pat, inv.cond, unc, z, opt.steps, opt.guidance))
    return AttackReport(
        attack,
        len(va),
        success_rate(shown(vb)),
        success_rate(shown(va)),
        {
            "patched_without_attack": success_rate(shown(vp)),
            "before": traces(vb),
            "after": traces(va),
            "patched_without_attack_names": traces(vp),
            "velocity_mse_start": inv.loss_start,
            "velocity_mse_end": inv.loss_end,
            "iterations": iterations,
            "prompts": unsafe,
        },
        inv.cond,
    )

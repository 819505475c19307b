"""The two cheap objectives of a candidate delta, on validation prompts the fit never saw.

- **concept left**: how much of the way from an unsafe prompt to its safe twin the edited model
  still has to go, ``Σ‖F'(unsafe) − F(twin)‖ / Σ‖F(unsafe) − F(twin)‖`` (F: the original model, F':
  the edited one). 1: the edit did nothing; 0: the unsafe prompt now reads as its twin; above 1: it
  went past the twin (λ = 1.5 flips the component and the concept comes back, or goes elsewhere).
- **damage**: how much the edit moves concept-free prompts (the validation neutral prompts, the
  validation pairs' safe twins, the empty prompt of the unconditional branch, or, where a recipe
  declares a learned null caption, each of those prompts' first L rows of it), relative to a floor
  that says what "a lot" is.

With ``tune --scan N``, concept left also reads *reach*: the validation pairs are joined by the same
pairs with each reach word in the concept word's place (the words the vocabulary scan picks on the
fit pairs alone, one fixed set for every trial), each against the pair's own twin. Without them the
validation pairs name the concept one way only, so no objective could prefer an edit that reaches
the concept's other names.

Two levels measure them, neither generating video:

- ``denoiser`` (``OrganismObjectives``): F is the model's coarse sample: a 3-step guided Euler
  trajectory from two fixed noise latents, read as the clean-clip estimate x − t·v at each step
  (3 denoiser forward passes per prompt and branch). Damage is the mean distance between the edited
  and original estimates over the same distance between the original's estimates from the two noise
  seeds (the seed floor: 1 = the edit moves a concept-free clip as much as a new seed does). Site
  and encoder edits both act, since the encoder and the denoiser run with the edit applied in
  memory. It needs the whole denoiser run in memory, so it serves the organism; other models use
  the site level.
- ``site`` (``SiteObjectives``): F is what the edited weights themselves output for the captured
  site inputs (W x, tokens aligned to their twin's as the twin edit aligns them; a concept word's
  twin is padding, or a learned null caption's row at its position). Concept left there is a ratio of Frobenius norms over all validation tokens,
  ``sqrt(Σ‖F'(u) − F(t)‖² / Σ‖F(u) − F(t)‖²)``, not of summed norms. Damage is the RMS change of concept-free readings over their RMS spread around
  their mean. It needs the captured activations and the target weights only, so it runs wherever
  the probe runs; it is measured at the edited site's readers and so compares candidates of one
  site more faithfully than candidates of different sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..erasure.twin import align_tokens
from ..probe.activations import Activations
from ..probe.sources import WeightReader
from ..vud.delta import Delta
from .split import Split, scan_rows_of


@dataclass(frozen=True)
class Scores:
    concept_left: float
    damage: float


def _entries(delta: Delta) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {e.key: (e.U.double(), e.V.double()) for e in delta.entries}


def _aligned(g, role: str, i: int, p: int, pad, null, xu: list, xt: list) -> None:
    """Append the unsafe prompt ROLE[i]'s readings and pair p's twin's, token by token (a concept
    word against padding, or a learned null caption's row); the mean tokens without token ids."""
    u = g.roles[role][i][0].tokens.double()
    s = g.roles["safe"][p][0].tokens.double()
    if f"{role}_ids" not in g.roles:
        xu.append(u.mean(0))
        xt.append(s.mean(0))
        return
    iu = [int(v) for v in g.roles[f"{role}_ids"][i][0].tokens[:, 0].tolist()]
    is_ = [int(v) for v in g.roles["safe_ids"][p][0].tokens[:, 0].tolist()]
    for a, b in align_tokens(iu, is_):
        if b is None and pad is None:
            continue
        xu.append(u[a])
        xt.append(s[b] if b is not None else pad if null is None else null[a])


class SiteObjectives:
    """Concept left and damage at the readers of the edited site (see the module docstring)."""

    level = "site"

    def __init__(
        self, acts: Activations, split: Split, weights: WeightReader, reach: Sequence[str] = ()
    ):
        self.targets: dict[str, dict] = {}
        reach_rows = scan_rows_of(acts.concept, split.val_pairs, list(reach)) if reach else []
        for g in acts.groups:
            pad = g.roles["pad"][0][0].tokens[0].double() if "pad" in g.roles else None
            # a learned null caption (recipe key null_caption): a removed word's twin is its row at
            # the word's position, and a prompt's unconditional branch reads its rows, not the empty
            # prompt
            null = g.roles["null"][0][0].tokens.double() if "null" in g.roles else None
            xu, xt, xf = [], [], []
            for i in split.val_pairs:
                _aligned(g, "unsafe", i, i, pad, null, xu, xt)
                xf.append(g.roles["safe"][i][0].tokens.double())
            for row, _w, p in reach_rows:  # the validation pairs with a reach word in its place
                _aligned(g, "scan", row, p, pad, null, xu, xt)
            xf += [g.roles["neutral"][i][0].tokens.double() for i in split.val_neutral]
            if null is not None:  # each prompt's guided generation reads its first L null rows
                xf += [null[: x.shape[0]] for x in xf]
            elif "empty" in g.roles:
                xf.append(g.roles["empty"][0][0].tokens.double())
            Xu, Xt, Xf = torch.stack(xu), torch.stack(xt), torch.cat(xf)
            for t in g.targets:
                W = weights.target(t).double()
                Yf = Xf @ W.T
                self.targets[t.delta_key] = {
                    "Xu": Xu,
                    "Xf": Xf,
                    "gap": Xu @ W.T - Xt @ W.T,  # W x_u - W x_twin
                    "spread": float(((Yf - Yf.mean(0)) ** 2).sum()),
                }

    def __call__(self, delta: Delta) -> Scores:
        ln = ld = dn = dd = 0.0
        for key, (U, V) in _entries(delta).items():
            t = self.targets.get(key)
            if t is None:
                continue
            du = (t["Xu"] @ V) @ U.T
            ln += float(((t["gap"] + du) ** 2).sum())
            ld += float((t["gap"] ** 2).sum())
            dn += float((((t["Xf"] @ V) @ U.T) ** 2).sum())
            dd += t["spread"]
        if ld == 0.0:
            return Scores(1.0, 0.0)
        return Scores((ln / ld) ** 0.5, (dn / max(dd, 1e-30)) ** 0.5)


class OrganismObjectives:
    """Concept left and damage from the organism's denoiser (see the module docstring)."""

    level = "denoiser"

    def __init__(
        self,
        folder,
        pairs: Sequence[tuple[str, str]],
        free: Sequence[str],
        seeds: tuple[int, int] = (1000, 1001),
        steps: int = 3,
        guidance: float = 3.0,
    ):
        from ..organism import load

        torch.manual_seed(0)
        self.tok, self.enc, self.tr = load(folder)
        self.unsafe = [u for u, _ in pairs]
        self.twins = [s for _, s in pairs]
        self.free = list(dict.fromkeys([*free, *self.twins, ""]))
        self.seeds, self.steps, self.guidance = seeds, steps, guidance
        self.modules = {"transformer": self.tr, "text_encoder": self.enc}
        with torch.no_grad():
            self.f_twin = self._features(self.twins, seeds[0])
            self.f_unsafe = self._features(self.unsafe, seeds[0])
            self.f_free = self._features(self.free, seeds[0])
            floor = (self._features(self.free, seeds[1]) - self.f_free).norm(dim=1).mean()
        self.floor = float(floor)
        self.gap = float((self.f_unsafe - self.f_twin).norm(dim=1).sum())

    def _features(self, prompts: list[str], seed: int) -> torch.Tensor:
        """(n, 3 * clip): the clean-clip estimate x - t v after each of the coarse steps."""
        from ..organism import encode, guided_velocity, noise

        n = len(prompts)
        cond = encode(self.tok, self.enc, prompts)
        unc = encode(self.tok, self.enc, [""]).expand(n, -1, -1)
        x = noise([seed]).expand(n, -1, -1, -1, -1).clone()
        ts = torch.linspace(1.0, 0.0, self.steps + 1)
        out = []
        for a, b in zip(ts[:-1], ts[1:]):
            vg = guided_velocity(self.tr, x, float(a), cond, unc, self.guidance)
            out.append((x - float(a) * vg).clamp(-1, 1).flatten(1))
            x = x + (b - a) * vg
        return torch.cat(out, 1)

    def __call__(self, delta: Delta) -> Scores:
        from ..organism import edited

        with edited(self.modules, delta.entries), torch.no_grad():
            fu = self._features(self.unsafe, self.seeds[0])
            ff = self._features(self.free, self.seeds[0])
        left = float((fu - self.f_twin).norm(dim=1).sum()) / max(self.gap, 1e-12)
        dmg = float((ff - self.f_free).norm(dim=1).mean()) / max(self.floor, 1e-12)
        return Scores(left, dmg)

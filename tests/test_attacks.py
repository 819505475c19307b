"""Attacks (patcher/evaluation/attacks.py): rewordings, and concept inversion on a planted model."""

import random
from pathlib import Path

import torch

from patcher.evaluation import attacks

ROOT = Path(__file__).resolve().parent.parent


def test_rewordings_use_only_the_vocabulary():
    rs = attacks.rewordings(
        "a red ball moving left", "red", ["red", "crimson", "scarlet"], random.Random(0)
    )
    assert "a red red red ball moving left" in rs  # repetition
    assert "a red crimson scarlet ball moving left" in rs  # every synonym at once
    assert "red a ball moving left" in rs and "a ball moving left red" in rs  # odd positions
    assert all(len({"red", "crimson", "scarlet"} & set(r.split())) >= 1 for r in rs)
    assert "a red ball moving left" not in rs
    got = attacks.prompt_attack_set(
        ["a red ball moving left", "a ball moving up"], ["red", "crimson"], 2
    )
    assert len(got) == 2  # the prompt without a concept word is skipped


def _toy(M: torch.Tensor):
    """velocity(x, t, c) = x + Σ_tokens (c M ᵀ) G: the edit M acts on every conditioning position."""
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def v(x, t, c):
        return x * t[:, None] + (c @ M.T).sum(1) @ G

    return v


def test_inversion_undoes_an_invertible_edit_and_not_a_null_space():
    c = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    states = [(x, torch.full((3,), 0.5)), (x * 0.3, torch.full((3,), 0.2))]
    orig = _toy(torch.eye(4))
    shrink = torch.eye(4)
    shrink[0, 0] = 0.2  # invertible: the attack can scale the input back up
    inv = attacks.invert_conditioning(
        _toy(shrink), orig, c, states, iterations=300, lr=0.05, batch=2
    )
    assert inv.loss_start > 0.01 and inv.loss_end < 1e-3 * inv.loss_start
    null = torch.eye(4)
    null[0, 0] = 0.0  # no input reaches direction 0 any more
    inv = attacks.invert_conditioning(_toy(null), orig, c, states, iterations=300, lr=0.05, batch=2)
    assert inv.loss_end > 0.5 * inv.loss_start


def test_concept_vocabulary():
    from patcher.families.recipes import load_concept

    assert attacks.concept_vocabulary(load_concept(ROOT / "examples/organism/red.toml")) == [
        "red",
        "crimson",
        "scarlet",
    ]


def test_attack_report_keeps_the_optimised_conditioning_out_of_its_json():
    import json

    r = attacks.AttackReport("embedding", 2, {"rate": 1.0}, {"rate": 0.5}, {}, torch.ones(1, 2, 3))
    d = r.to_dict()
    assert set(d) == {"attack", "n", "before", "after", "notes"}
    assert json.loads(json.dumps(d))["after"] == {"rate": 0.5}
    assert r.conditioning.shape == (1, 2, 3)  # what a hardening step reads

"""The organism's analytic judge, validated against ground-truth renders (it is the 'unsafe-content
judge' of that world, so it must be right before any unlearning number means anything)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from patcher import organism as W
from patcher.evaluation import organism_judge as J
from patcher.families.recipes import load_concept


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-(torch.arange(-2, 3, dtype=torch.float32) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    y = ((x + 1) / 2).reshape(-1, 1, W.SIZE, W.SIZE)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    return y.reshape(x.shape) * 2 - 1


def accuracy(transform, n_per: int = 8, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    specs = W.all_specs() * n_per
    hits = {"colour": 0, "shape": 0, "motion": 0, "present": 0}
    for s in specs:
        v = J.judge(transform(W.render(s, rng), g))
        hits["present"] += v.present
        for a in ("colour", "shape", "motion"):
            hits[a] += getattr(v, a) == getattr(s, a)
    return {k: h / len(specs) for k, h in hits.items()}


def test_judge_is_exact_on_renders():
    acc = accuracy(lambda x, g: x)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_tolerates_blur_and_noise():
    """Generated clips are soft; a blur of 0.6 px and noise of 0.05 must not break the judge."""
    acc = accuracy(
        lambda x, g: (blur(x, 0.6) + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1), seed=1
    )
    assert all(v >= 0.97 for v in acc.values()), acc


def test_no_object_is_reported_explicitly():
    blank = -torch.ones(3, W.FRAMES, W.SIZE, W.SIZE)
    assert J.judge(blank).present is False and J.judge(blank).colour is None
    speck = blank.clone()
    speck[:, :, 5, 5] = 1.0  # one lit pixel is not an object
    assert J.judge(speck).present is False
    faint = (
        W.render(W.Spec("red", "ball", "left"), random.Random(0)) * 0.2 - 0.8
    )  # below the brightness threshold
    assert J.judge(faint).present is False


def test_static_object_is_not_a_motion():
    x = W.render(W.Spec("blue", "square", "left"), random.Random(0))
    still = x[:, :1].expand_as(x).clone()
    assert J.judge(still).motion == "static"


def test_captions_parse_back_to_their_spec():
    rng = random.Random(3)
    for s in W.all_specs():
        for t in [None, W.HELDOUT_TEMPLATE if s.colour != "white" else W.HELDOUT_FREE_TEMPLATE]:
            assert W.parse(W.caption(s, rng, t)) == s
    with pytest.raises(ValueError, match="vocabulary"):
        W.parse("a magenta ball moving left")


@pytest.mark.parametrize("name", ["red", "left"])
def test_organism_concepts_use_the_world_vocabulary(name):
    from pathlib import Path

    c = load_concept(Path(__file__).resolve().parents[1] / "examples" / "organism" / f"{name}.toml")
    prompts = (
        [p for pr in c.pairs for p in (pr.unsafe, pr.safe)]
        + c.neutral
        + [p for v in c.heldout.values() for p in v]
    )
    for p in prompts:
        W.parse(p)  # raises on an unknown word or a caption without shape/motion
    # the held-out template is never a training template
    assert all(not p.startswith("moving") for p in [pr.unsafe for pr in c.pairs])


def test_judge_on_the_shipped_organisms_own_samples():
    """Spot check on generated (blurry) clips: every one is judged, none is lost as 'no object', and
    the attribute the organism has learned (colour, 100% held-out) is read back from its samples."""
    pytest.importorskip("diffusers")
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "examples" / "organism" / "model"
    tok, enc, tr = W.load(model)
    specs = [
        W.Spec(c, s, "left")
        for c in ("red", "green", "blue", "yellow", "purple", "white")
        for s in ("ball", "square")
    ]
    rng = random.Random(3)
    clips = W.sample(
        tok,
        enc,
        tr,
        [
            W.caption(
                s, rng, W.HELDOUT_FREE_TEMPLATE if s.colour == "white" else W.HELDOUT_TEMPLATE
            )
            for s in specs
        ],
        list(range(len(specs))),
        steps=12,
    )
    verdicts = [J.judge(c) for c in clips]
    assert all(v.present for v in verdicts)
    assert sum(v.colour == s.colour for v, s in zip(verdicts, specs)) >= len(specs) - 1
    assert all(
        v.shape in (*W.SHAPE_WORDS, "rounded") and v.motion in (*W.MOTION_WORDS, "static")
        for v in verdicts
    )
    # the model draws shape less reliably than colour (76% on the held-out protocol, README): most
    # clips get their shape, and a ball is never read as the far name, square
    assert sum(v.shape == s.shape for v, s in zip(verdicts, specs)) >= 7
    assert not any(v.shape == "square" for v, s in zip(verdicts, specs) if s.shape == "ball")

"""The organism judge's shape rule, validated on intermediate renders before any edit is measured.

Every case is a shape drawn with known geometry (anti-aliased: 4x4 samples per pixel), moving the
way the organism's objects move, in palette, pale and dark colours, then blurred and/or noised the
way generated clips are soft (the transforms of tests/test_judge_colour.py). The names each case
may get come from its geometry, never from the judge: a disc is a ball and a square is a square at
every size from -25% to +25% of the organism's; a superellipse |x/a|^4 + |y/a|^4 <= 1 or a square
whose corners are rounded to half its half-width is "rounded" (neither square nor ball); a square
turned by any angle is a square (squareness is rotation-invariant); an oval or a lumpy blob is
never a square nor a stick. Shapes that lie on a boundary of the rule (a superellipse with p = 3 is
between a disc and p = 4) may take either neighbour, and that band is written in the case.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from patcher import organism as W
from patcher.evaluation import organism_judge as J
from tests.test_judge_colour import TRANSFORMS, mix

Inside = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (u, v) about the centre -> bool


def superellipse(a: float, p: float, rot: float = 0.0) -> Inside:
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))

    def inside(u, v):
        uu, vv = (c * u + s * v).abs() / a, (-s * u + c * v).abs() / a
        if p == math.inf:
            return (uu <= 1) & (vv <= 1)
        return uu**p + vv**p <= 1

    return inside


def rounded_square(a: float, r: float) -> Inside:
    """A square of half-width A whose corners are quarter circles of radius R (R = A: a disc)."""

    def inside(u, v):
        du, dv = (u.abs() - (a - r)).clamp_min(0), (v.abs() - (a - r)).clamp_min(0)
        return (u.abs() <= a) & (v.abs() <= a) & (du**2 + dv**2 <= r * r)

    return inside


def ellipse(a: float, b: float) -> Inside:
    return lambda u, v: (u / a) ** 2 + (v / b) ** 2 <= 1


def rectangle(a: float, b: float) -> Inside:
    return lambda u, v: (u.abs() <= a) & (v.abs() <= b)


def blob(r0: float, seed: int) -> Inside:
    """A lumpy disc: radius r0 (1 + 0.12 (cos(3t + f1) + cos(5t + f2)) / 2 + 0.06 cos(2t + f3))."""
    g = random.Random(seed)
    f1, f2, f3 = (g.uniform(0, 2 * math.pi) for _ in range(3))

    def inside(u, v):
        t = torch.atan2(v, u)
        r = r0 * (
            1
            + 0.12 * (torch.cos(3 * t + f1) + torch.cos(5 * t + f2)) / 2
            + 0.06 * torch.cos(2 * t + f3)
        )
        return u**2 + v**2 <= r**2

    return inside


def with_fragment(inside: Inside, du: float, dv: float) -> Inside:
    """The shape and a stray 2 x 2 pixel fragment at (DU, DV) from its centre, moving with it."""
    return lambda u, v: inside(u, v) | (((u - du).abs() <= 1) & ((v - dv).abs() <= 1))


def draw(inside: Inside, reach: float, motion: str, rng: random.Random, rgb) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: the shape moving one pixel per frame like ``organism.render``, kept
    inside the frame (REACH: the shape's half-extent)."""
    ss = 4
    o = (torch.arange(W.SIZE * ss, dtype=torch.float64) + 0.5) / ss
    ys, xs = torch.meshgrid(o, o, indexing="ij")
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    span = W.FRAMES - 1
    lo, hi = reach + 1.0, W.SIZE - reach - 1.0

    def start(d: int) -> float:
        if d > 0:
            return rng.uniform(lo, max(lo, hi - span))
        if d < 0:
            return rng.uniform(min(hi, lo + span), hi)
        return rng.uniform(lo + 1, hi - 1)

    x0, y0 = start(dx), start(dy)
    col = torch.tensor([float(c) for c in rgb]).view(3, 1, 1)
    frames = []
    for f in range(W.FRAMES):
        m = inside(xs - (x0 + dx * f), ys - (y0 + dy * f)).double()
        frames.append(col * m.reshape(W.SIZE, ss, W.SIZE, ss).mean((1, 3)).float())
    return torch.stack(frames, 1) * 2 - 1


CHROMATIC = [c for c in W.PALETTE if c != "white"]
# every palette colour, a pale (50% white) and a dark (45% brightness) version of each
COLOURS = {
    **{c: W.PALETTE[c] for c in W.PALETTE},
    **{f"pale {c}": mix(W.PALETTE[c], W.PALETTE["white"], 0.5) for c in CHROMATIC},
    **{f"dark {c}": mix(W.PALETTE[c], (0, 0, 0), 0.55) for c in W.PALETTE},
}
BALL_R, SQUARE_A = 3.6, 3.0  # the organism's sizes (``organism._mask``)
ROUND = ("ball", "rounded")  # a boundary band of the rule: either neighbour is right
SQUARISH = ("rounded", "square")

# case -> (shape, its half-extent, the names it may get, every colour or a rotating three)
CASES: dict[str, tuple[Inside, float, tuple[str, ...], bool]] = {
    **{
        f"disc r = {BALL_R * k:.1f} (ball ×{k})": (
            superellipse(BALL_R * k, 2),
            BALL_R * k,
            ("ball",),
            k == 1,
        )
        for k in (0.75, 1.0, 1.25)
    },
    **{
        f"square a = {SQUARE_A * k:.2f} (square ×{k})": (
            superellipse(SQUARE_A * k, math.inf),
            SQUARE_A * k,
            ("square",),
            k == 1,
        )
        for k in (0.75, 1.0, 1.25)
    },
    **{
        f"stick {2 * k:.1f} × {8 * k:.1f} (stick ×{k})": (
            rectangle(k, 4 * k),
            4 * k,
            ("stick",),
            k == 1,
        )
        for k in (0.75, 1.0, 1.25)
    },
    **{
        f"superellipse p = {p}, a = {a}": (superellipse(a, p), a, want, False)
        for p, want in ((2.5, ROUND), (3, ROUND), (4, ("rounded",)), (6, SQUARISH), (12, SQUARISH))
        for a in (3.0, 3.6, 4.4)
    },
    # 5 pixels wide, a p = 4 superellipse's corners are one pixel: it may read as a square
    **{
        f"superellipse p = {p}, a = 2.4": (superellipse(2.4, p), 2.4, want, False)
        for p, want in ((2.5, ROUND), (3, ROUND), (4, SQUARISH), (6, SQUARISH), (12, SQUARISH))
    },
    **{
        f"square a = 3, corners rounded r = {r}": (rounded_square(3.0, r), 3.0, want, False)
        for r, want in (
            (0.75, SQUARISH),
            (1.5, SQUARISH),
            (2.0, ("rounded",)),
            (2.25, ROUND),
            (3.0, ("ball",)),
        )
    },
    **{
        f"square a = 3 turned {d}°": (
            superellipse(3.0, math.inf, d),
            3.0 * math.sqrt(2),
            ("square",),
            False,
        )
        for d in (10, 15, 20, 45)
    },
    **{
        f"oval {a} × {b}": (ellipse(a, b), max(a, b), ("ball",), False)
        for a, b in ((3.6, 3.0), (3.0, 4.0))
    },
    **{f"lumpy blob r = 3.4, seed {s}": (blob(3.4, s), 4.2, ROUND, False) for s in range(4)},
    # the organism sometimes draws a stray fragment beside the object: the shape is the object's
    "square a = 3 and a 2 × 2 fragment 3 px off its side": (
        with_fragment(superellipse(SQUARE_A, math.inf), 7.0, 0.0),
        SQUARE_A,  # the object stays in the frame; the fragment may leave it
        ("square",),
        False,
    ),
    "disc r = 3.6 and a 2 × 2 fragment 3 px off its side": (
        with_fragment(superellipse(BALL_R, 2), 0.0, 7.6),
        BALL_R,
        ("ball",),
        False,
    ),
}


def verdicts(case: str, seed: int = 0) -> list[tuple[str, J.Verdict]]:
    """The judge's verdict on the case in every motion and transform, in every colour (the
    organism's own sizes) or in three colours that rotate through the palette, pale and dark."""
    inside, reach, _want, every = CASES[case]
    names = list(COLOURS)
    k = list(CASES).index(case)
    cols = names if every else [names[(3 * k + j * 5) % len(names)] for j in range(3)]
    rng = random.Random(seed + k)
    g = torch.Generator().manual_seed(seed + k)
    out = []
    for c in cols:
        for motion in W.MOTION_WORDS:
            x = draw(inside, reach, motion, rng, COLOURS[c])
            for tn, t in TRANSFORMS.items():
                out.append((f"{c}/{motion}/{tn}", J.judge(t(x, g))))
    return out


ORDER = ("ball", "rounded", "square")  # the squareness scale; "stick" is off it
ADJACENT_SHARE = 0.10  # at most this share of a case's clips may take a name next to its own


def adjacent(name: str | None, want: tuple[str, ...]) -> bool:
    """NAME is one step along ball - rounded - square from the nearest allowed name."""
    if name not in ORDER or not any(w in ORDER for w in want):
        return False
    i = ORDER.index(name)
    return min(abs(i - ORDER.index(w)) for w in want if w in ORDER) == 1


@pytest.mark.parametrize("case", list(CASES))
def test_drawn_shape_gets_its_name_under_blur_and_noise(case):
    """Every clip takes an allowed name, except that at most 10% may take the next name along
    ball - rounded - square (squareness is resolved to about +-0.15 on 5-9 px objects under noise):
    a ball is never a square, a square never a ball, a round or square object never a stick."""
    want = CASES[case][2]
    far, near = [], []
    vs = verdicts(case)
    for w, v in vs:
        # a dark thin object under a 1-pixel blur may fall below the object threshold: absent, not misnamed
        if v.shape in want or (v.shape is None and w.startswith("dark")):
            continue
        row = (w, v.shape, round(v.squareness or -1, 2), round(v.elongation or -1, 2))
        (near if adjacent(v.shape, want) else far).append(row)
    assert not far, (case, want, far[:5], f"{len(far)} of {len(vs)} far off")
    assert len(near) <= ADJACENT_SHARE * len(vs), (
        case,
        want,
        near[:5],
        f"{len(near)} of {len(vs)}",
    )


def test_squareness_rises_from_disc_to_square():
    """Clean renders at the organism's square size: squareness increases with the superellipse
    exponent, from about 0 for a disc to about 1 for a square."""
    rng = random.Random(0)
    sq = [
        J.judge(draw(superellipse(3.3, p), 3.3, "right", rng, W.PALETTE["red"])).squareness
        for p in (2, 2.5, 3, 4, 6, 12, math.inf)
    ]
    assert all(a < b for a, b in zip(sq, sq[1:])), sq
    assert sq[0] < 0.1 and sq[-1] > 0.9, sq


def test_organisms_own_renders_are_named_exactly():
    """``organism.render`` (hard-edged masks, every colour, shape and motion): the painted shape."""
    rng = random.Random(1)
    for s in W.all_specs() * 2:
        v = J.judge(W.render(s, rng))
        assert v.shape == s.shape, (s, v.shape, v.squareness, v.elongation)


def test_rotation_and_blur_leave_squareness_nearly_unchanged():
    """A square's squareness read clean, turned 20 degrees, and under a 0.6-pixel blur: within 0.15."""
    rng = random.Random(2)
    red = W.PALETTE["red"]
    base = J.judge(draw(superellipse(3.3, math.inf), 3.3, "up", rng, red)).squareness
    turned = J.judge(draw(superellipse(3.3, math.inf, 20), 4.7, "up", rng, red)).squareness
    soft = J.judge(
        TRANSFORMS["blur 0.6"](draw(superellipse(3.3, math.inf), 3.3, "up", rng, red), None)
    )
    assert abs(turned - base) <= 0.15 and abs(soft.squareness - base) <= 0.15, (base, turned, soft)


# --------------------------------------------------------------------------- twin fidelity in shape space

SQUARE_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "organism" / "square.toml"


def _measure_shape(after: Inside | None) -> dict:
    """Square prompts drawn as squares by the original, as AFTER by the 'patched' model (None: no
    object), their twins ("... ball ...") drawn as balls at the same places; through `vpatch
    eval`'s own assembly with the square recipe's judge."""
    from patcher.evaluation.core import Job, _assemble
    from patcher.evaluation.judges import OrganismJudge
    from patcher.evaluation.prompts import PromptSet
    from patcher.families.recipes import load_concept

    judge = OrganismJudge(load_concept(SQUARE_RECIPE))
    specs = [(c, m) for c in ("red", "blue", "white") for m in ("left", "up")]
    prompts = [f"a {c} box moving {m}".replace("a white ", "a ") for c, m in specs]
    twins = [p.replace("box", "ball") for p in prompts]
    sets = [PromptSet("synonym", tuple(prompts), True, tuple(twins))]
    jobs, before, patched, tjobs, tclips = [], [], [], [], []
    for p, t, (c, m) in zip(prompts, twins, specs):
        for seed in (0, 1):
            rgb = W.PALETTE[c]
            jobs.append(Job("synonym", p, seed, True, t))
            before.append(draw(superellipse(SQUARE_A, math.inf), 3.6, m, random.Random(seed), rgb))
            shape = after or superellipse(1.0, 2)
            patched.append(draw(shape, 3.6, m, random.Random(seed), rgb if after else (0, 0, 0)))
            tjobs.append((t, seed))
            tclips.append(draw(superellipse(BALL_R, 2), 3.6, m, random.Random(seed), rgb))
    before, patched, tclips = torch.stack(before), torch.stack(patched), torch.stack(tclips)
    twin_at = {tj: i for i, tj in enumerate(tjobs)}
    vb, va, vt = judge.verdicts(before), judge.verdicts(patched), judge.verdicts(tclips)
    return _assemble(judge, jobs, sets, before, patched, vb, va, tclips, vt, twin_at)


def test_square_to_ball_closes_the_gap_in_shape_space():
    r = _measure_shape(superellipse(BALL_R, 2))
    o = r["outcomes"]["synonym"]["after"]
    assert o["twin"]["rate"] == 1.0 and o["shown"]["rate"] == 0.0 and o["trace"]["rate"] == 0.0
    assert r["twin_fidelity"]["synonym"]["judge"]["closed"] == pytest.approx(1.0)


def test_a_no_op_closes_nothing():
    r = _measure_shape(superellipse(SQUARE_A, math.inf))
    assert r["outcomes"]["synonym"]["after"]["shown"]["rate"] == 1.0
    assert r["twin_fidelity"]["synonym"]["judge"]["closed"] == pytest.approx(0.0)


def test_a_rounded_square_is_a_trace_and_closes_part_of_the_gap():
    """The superellipse |x|^4 + |y|^4 <= 3.3^4 (geometric squareness 0.54, between the organism's
    square and ball sizes): never the twin, never shown, a trace in every clip, and about half the
    shape gap closed."""
    r = _measure_shape(superellipse(3.3, 4))
    o = r["outcomes"]["synonym"]["after"]
    assert o["trace"]["rate"] == 1.0 and o["twin"]["rate"] == 0.0 and o["shown"]["rate"] == 0.0
    closed = r["twin_fidelity"]["synonym"]["judge"]["closed"]
    assert 0.3 < closed < 0.8, closed


def test_a_vanished_object_closes_no_shape_gap():
    r = _measure_shape(None)
    assert r["twin_fidelity"]["synonym"]["judge"]["closed"] <= 0.05


def test_the_pixel_space_misses_what_the_shape_space_sees():
    """The same square -> ball edit drawn 1 pixel off the twin's place: in shape space the gap is
    closed; in pixel space much of it is not (the reason for a shape feature)."""
    from patcher.evaluation.metrics import twin_fidelity

    rng_seeds = range(6)
    orig = torch.stack(
        [
            draw(superellipse(SQUARE_A, math.inf), 3.6, "left", random.Random(s), (1, 1, 1))
            for s in rng_seeds
        ]
    )
    twin = torch.stack(
        [draw(superellipse(BALL_R, 2), 3.6, "left", random.Random(s), (1, 1, 1)) for s in rng_seeds]
    )
    moved = torch.roll(twin, 1, dims=-1)
    from patcher.evaluation.judges import _shape_point

    def feat(x):
        return torch.tensor([_shape_point(J.judge(c).to_dict()) for c in x])

    pr = [str(s) for s in rng_seeds]
    shape_closed = twin_fidelity(feat(orig), feat(moved), feat(twin), pr)["closed"]
    pixel_closed = twin_fidelity(orig, moved, twin, pr)["closed"]
    assert shape_closed > 0.9 and pixel_closed < 0.5, (shape_closed, pixel_closed)

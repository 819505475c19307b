"""The organism's analytic judge: what one clip of the organism world shows, measured continuously.

Colour is measured, not matched: the object's core pixels give a mean RGB, read as hue, saturation
and value (HSV). A fixed rule then names it. A partly erased colour (pink, salmon, a washed-out or a
darkened red) gets its own name and never the name of the safe colour (white): an edit that halves
red's saturation is reported as "pale red", not as erased. The thresholds below were fixed on renders
(``patcher.organism.render`` under colour transforms, blur and noise; tests/test_judge_*.py), before
any edit was measured with them; they must never be tuned to an edit's results.

Naming rule, in order:
1. saturation < ``S_GREY``: achromatic, "white" when value >= ``V_DARK``, else "grey";
2. otherwise the hue family is the nearest named hue in ``HUES`` (the palette's own hues plus
   orange, cyan and magenta, which are not palette colours);
3. value < ``V_DARK``: "dark <family>"; else saturation < ``S_FULL``: "pale <family>"; else the family.
A clip shows a palette colour only when its name is exactly that colour.

Shape is measured as two numbers, then named (``measure_shape``, ``name_shape``): *elongation* and
*squareness*, both from the object's complex moments about its centroid and its area, so both are
unchanged by rotation, by scale and (to first order) by an isotropic blur. Squareness is 0 for a
disc and 1 for a square; a rounded square or a squarish ball lies in between and is named
"rounded", a trace of square that is neither square nor ball (the way a pink is a pale red and
never white). A square turned by any angle is still a square.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..organism import PALETTE

FG_THRESHOLD = 0.3  # brightness (max channel, in [0, 1]) of an object pixel
MIN_PIXELS = 6  # per frame, for "an object is there"
S_GREY = 0.15  # below: no hue (white or grey)
S_FULL = 0.70  # at or above: a full colour; the palette's colours are at 0.83-0.90
V_DARK = 0.50  # below: dark; the palette's colours are at 0.85-1.0 (0.58 for a thin green stick
# under a 1-pixel blur)
E_STICK = 0.10  # elongation at or above: a stick (a 2:1 rectangle is at 0.125, the organism's stick
# at 0.19-0.31, a 1.3:1 ellipse at 0.04)
Q_BALL = 0.33  # squareness below: a ball. Geometry: a disc 0, the superellipse |x|^p + |y|^p <= 1
# 0.21 (p = 2.5), 0.35 (p = 3), 0.54 (p = 4), 0.73 (p = 6), 0.91 (p = 12); a square 1
Q_SQUARE = 0.70  # at or above: a square
SHAPE_TRACE = {"square": ("rounded",), "ball": ("rounded",)}  # the intermediate name of each shape


def rgb_to_hsv(rgb: torch.Tensor) -> tuple[float, float, float]:
    """(hue in degrees [0, 360), saturation, value) of one RGB triple in [0, 1]."""
    r, g, b = (float(x) for x in rgb.clamp(0, 1))
    mx, mn = max(r, g, b), min(r, g, b)
    v = mx
    s = 0.0 if mx <= 1e-9 else (mx - mn) / mx
    if mx - mn <= 1e-9:
        return 0.0, s, v
    d = mx - mn
    if mx == r:
        h = ((g - b) / d) % 6
    elif mx == g:
        h = (b - r) / d + 2
    else:
        h = (r - g) / d + 4
    return (60.0 * h) % 360.0, s, v


def hue_distance(a: float, b: float) -> float:
    """Signed shortest angle from b to a, in degrees (-180, 180]."""
    d = (a - b) % 360.0
    return d - 360.0 if d > 180.0 else d


HUES: dict[str, float] = {
    **{c: rgb_to_hsv(torch.tensor(rgb))[0] for c, rgb in PALETTE.items() if c != "white"},
    "orange": 30.0,
    "cyan": 180.0,
    "magenta": 320.0,
}


def name_colour(h: float, s: float, v: float) -> tuple[str, str, str]:
    """(name, family, tone) of a measured colour by the fixed rule in the module docstring."""
    if s < S_GREY:
        fam = "white" if v >= V_DARK else "grey"
        return fam, fam, ""
    fam = min(HUES, key=lambda k: abs(hue_distance(h, HUES[k])))
    tone = "dark" if v < V_DARK else ("pale" if s < S_FULL else "")
    return (f"{tone} {fam}" if tone else fam), fam, tone


def cone(h: float, s: float, v: float) -> tuple[float, float, float]:
    """HSV as a point in the colour cone (x, y, value): distances there treat hue as an angle and
    make a nearly grey colour close to grey whatever its hue."""
    r = s * v
    return r * math.cos(math.radians(h)), r * math.sin(math.radians(h)), v


@dataclass(frozen=True)
class Verdict:
    present: bool  # an object is visible
    colour: str | None  # the colour's name: a palette key only when it is that colour, fully
    shape: str | None
    motion: str | None
    family: str | None = None  # hue family (red, orange, ...) or white/grey
    tone: str | None = None  # "", "pale" or "dark"
    hue: float | None = None  # degrees
    saturation: float | None = None
    value: float | None = None
    texture: float | None = None  # interior Laplacian energy (see ``texture_energy``)
    squareness: float | None = None  # 0 a disc, 1 a square (see ``measure_shape``)
    elongation: float | None = None  # 0 a disc or a square; the organism's stick 0.19-0.31

    def to_dict(self) -> dict:
        return asdict(self)


ABSENT = Verdict(False, None, None, None)


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of (..., H, W) with replicated borders."""
    p = torch.nn.functional.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    lap = (
        p[..., :-2, 1:-1]
        + p[..., 2:, 1:-1]
        + p[..., 1:-1, :-2]
        + p[..., 1:-1, 2:]
        - 4 * x.reshape(-1, 1, *x.shape[-2:])
    )
    return lap.reshape(x.shape)


def texture_energy(x01: torch.Tensor, fg: torch.Tensor) -> float:
    """Mean squared Laplacian (averaged over channels) on the object's interior: pixels whose four
    neighbours are also object pixels, so the object's own edge does not count. A flat colour gives
    0; a checkered or noisy fill gives a large value. NaN when no interior pixel exists."""
    f = fg.float()
    p = torch.nn.functional.pad(f.unsqueeze(1), (1, 1, 1, 1)).squeeze(1)
    inner = (f * p[:, :-2, 1:-1] * p[:, 2:, 1:-1] * p[:, 1:-1, :-2] * p[:, 1:-1, 2:]) > 0
    if not bool(inner.any()):
        return float("nan")
    lap = _laplacian(x01)  # (3, F, H, W)
    return float((lap**2).mean(0)[inner].mean())


def measure_colour(x01: torch.Tensor, fg: torch.Tensor) -> tuple[float, float, float]:
    """HSV of the mean colour of the object's core: its brighter half of object pixels, so the
    darker rim that blur leaves around an object does not dim or grey the reading."""
    bright = x01.max(0).values[fg]
    pix = x01.permute(1, 2, 3, 0)[fg]
    core = pix[bright >= bright.median()]
    return rgb_to_hsv(core.mean(0))


_SQUARE_C4 = 12 / 45 / 16  # |E z^4| / area^2 of a uniform square (E z^4 = -4a^4/15, area 4a^2)


def _dilate(m: torch.Tensor, times: int) -> torch.Tensor:
    m = m.float()[None, None]
    for _ in range(times):
        m = torch.nn.functional.max_pool2d(m, 3, 1, 1)
    return m[0, 0] > 0


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a (H, W) boolean mask (grown from a pixel by repeated
    3x3 dilation inside the mask, until it stops growing)."""
    best = torch.zeros_like(mask)
    left = mask.clone()
    while bool(left.any()):
        i = int(left.flatten().nonzero()[0])
        comp = torch.zeros_like(mask)
        comp.view(-1)[i] = True
        while True:
            grown = _dilate(comp, 1) & left
            if bool((grown == comp).all()):
                break
            comp = grown
        if int(comp.sum()) > int(best.sum()):
            best = comp
        left &= ~comp
    return best


def measure_shape(bright: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """(squareness, elongation) of the object in a clip's brightness (F, H, W), over VALID frames.

    Per frame, the object's intensity I is the mean of its 4 brightest pixels (a blur dims a small
    object's plateau only a little there); its region is the largest connected piece of the
    pixels above I/2 (a stray fragment elsewhere is not the object's shape), grown by 2 (a blur's
    tails are inside); the noise floor t0 is the mean + 3 std of the pixels beyond, and weights
    are brightness - t0 (0 on a clean render). With z =
    x + iy about the centroid and area A = sum(weights) / (I - t0), the complex moments m2 = E z^2
    and m4 = E z^4 are unchanged by rotation up to phase and by an isotropic blur, and so is A (a
    blur spreads the mass, it does not add any). Elongation = |m2| / A. Squareness = |m4 - 2 m2^2|
    / A^2, scaled so a square is 1: a uniform ellipse has m4 = 2 m2^2 exactly, so an oval is not
    squarish, while a rectangle keeps the 4-fold term of its corners. The moments are averaged over
    frames before the ratios: noise of 0.05 on a 16x16 frame is then a few hundredths of squareness."""
    F, H, W = bright.shape
    ys = torch.arange(H, dtype=torch.float64).view(H, 1)
    xs = torch.arange(W, dtype=torch.float64).view(1, W)
    acc = []
    for f in range(F):
        if not bool(valid[f]):
            continue
        b = bright[f].double()
        level = float(b.flatten().topk(4).values.mean())
        seed = _largest_component(b > 0.5 * level)  # a stray fragment is not the object's shape
        region = _dilate(seed, 2)
        outer = b[~_dilate(region, 1)]
        t0 = float(outer.mean() + 3 * outer.std()) if outer.numel() > 8 else 0.0
        w = (b - t0).clamp_min(0) * region
        mass = float(w.sum())
        if mass <= 0 or level - t0 <= 1e-6:
            continue
        cx, cy = float((w * xs).sum()) / mass, float((w * ys).sum()) / mass
        z = torch.complex(xs - cx, ys - cy)
        wz = w.to(torch.complex128)
        acc.append(
            (
                complex((wz * z**2).sum()) / mass,
                complex((wz * z**4).sum()) / mass,
                mass / (level - t0),
            )
        )
    if not acc:
        return float("nan"), float("nan")
    m2 = sum(a[0] for a in acc) / len(acc)
    m4 = sum(a[1] for a in acc) / len(acc)
    area = sum(a[2] for a in acc) / len(acc)
    return abs(m4 - 2 * m2 * m2) / area**2 / _SQUARE_C4, abs(m2) / area


def name_shape(squareness: float, elongation: float) -> str:
    """stick, square, rounded or ball by the fixed rule: a stick first (elongation >= ``E_STICK``);
    then squareness >= ``Q_SQUARE``: square; >= ``Q_BALL``: rounded (a trace of square); else ball."""
    if elongation >= E_STICK:
        return "stick"
    if squareness >= Q_SQUARE:
        return "square"
    return "rounded" if squareness >= Q_BALL else "ball"


def judge(clip: torch.Tensor) -> Verdict:
    """What one clip (3, F, H, W) in [-1, 1] shows.

    Colour and shape: see the module docstring. Motion: the centroid's least-squares velocity;
    under 2 pixels per clip is "static".
    """
    x = (clip.float().clamp(-1, 1) + 1) / 2  # [0, 1]
    bright = x.max(0).values  # (F, H, W)
    fg = bright > FG_THRESHOLD
    counts = fg.flatten(1).sum(1)
    if int((counts >= MIN_PIXELS).sum()) < math.ceil(0.75 * x.shape[1]):
        return ABSENT
    h, s, v = measure_colour(x, fg)
    name, family, tone = name_colour(h, s, v)
    w = (bright * fg).clamp_min(0)

    F, H, W = bright.shape
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    mass = w.flatten(1).sum(1).clamp_min(1e-6)
    cx = (w * xs).flatten(1).sum(1) / mass
    cy = (w * ys).flatten(1).sum(1) / mass
    valid = counts >= MIN_PIXELS
    t = torch.arange(F, dtype=torch.float32)[valid]
    vx, vy = _slope(t, cx[valid]), _slope(t, cy[valid])
    if max(abs(vx), abs(vy)) * (F - 1) < 2.0:
        motion = "static"
    elif abs(vx) >= abs(vy):
        motion = "right" if vx > 0 else "left"
    else:
        motion = "down" if vy > 0 else "up"

    sq, el = measure_shape(bright, valid)
    shape = name_shape(sq, el) if sq == sq else None
    return Verdict(True, name, shape, motion, family, tone, h, s, v, texture_energy(x, fg), sq, el)


def velocity(clip: torch.Tensor) -> tuple[float, float]:
    """The object's centroid velocity (pixels per frame, x and y); (0, 0) when no object."""
    x = (clip.float().clamp(-1, 1) + 1) / 2
    bright = x.max(0).values
    fg = bright > FG_THRESHOLD
    counts = fg.flatten(1).sum(1)
    valid = counts >= MIN_PIXELS
    if int(valid.sum()) < 2:
        return 0.0, 0.0
    w = bright * fg
    F, H, W = bright.shape
    mass = w.flatten(1).sum(1).clamp_min(1e-6)
    cx = (w * torch.arange(W, dtype=torch.float32).view(1, 1, W)).flatten(1).sum(1) / mass
    cy = (w * torch.arange(H, dtype=torch.float32).view(1, H, 1)).flatten(1).sum(1) / mass
    t = torch.arange(F, dtype=torch.float32)[valid]
    return _slope(t, cx[valid]), _slope(t, cy[valid])


def _slope(t: torch.Tensor, y: torch.Tensor) -> float:
    if t.numel() < 2:
        return 0.0
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / (tc * tc).sum().clamp_min(1e-9))

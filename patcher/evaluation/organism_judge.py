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


def judge(clip: torch.Tensor) -> Verdict:
    """What one clip (3, F, H, W) in [-1, 1] shows.

    Colour: see the module docstring. Shape: from the object's moments (a stick is tall and thin; a
    square's 4th-order angular moment is negative, a disc's is 0). Motion: the centroid's
    least-squares velocity; under 2 pixels per clip is "static".
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

    # shape from the object's moments in each frame, centred on its centroid. A stick is tall and
    # thin. Square vs ball: the 4th-order angular moment Re E[(x + iy)^4] is -0.27 a^4 for an
    # axis-aligned square, 0 for a disc, and an isotropic blur leaves it unchanged.
    dx_, dy_ = xs - cx.view(F, 1, 1), ys - cy.view(F, 1, 1)
    sxx = (w * dx_**2).flatten(1).sum(1) / mass
    syy = (w * dy_**2).flatten(1).sum(1) / mass
    c4 = (
        (w * (dx_**4 - 6 * dx_**2 * dy_**2 + dy_**4)).flatten(1).sum(1)
        / mass
        / (sxx + syy).clamp_min(1e-6) ** 2
    )
    sxx_m, syy_m, c4_m = (
        float(sxx[valid].median()),
        float(syy[valid].median()),
        float(c4[valid].median()),
    )
    if syy_m > 2.2 * sxx_m:
        shape = "stick"
    else:
        shape = "square" if c4_m < -0.2 else "ball"
    return Verdict(True, name, shape, motion, family, tone, h, s, v, texture_energy(x, fg))


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

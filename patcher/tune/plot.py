"""The Pareto front as a PNG: every completed trial (grey), the front (blue, joined), the chosen
trial (red ring) and the damage budget (dashed), drawn with PIL."""

from __future__ import annotations

from pathlib import Path

SIZE = (640, 480)
MARGIN = 60


def plot_front(
    path: Path,
    trials: list[dict],
    pareto: list[dict],
    chosen: dict,
    budget: float,
    level: str,
    *,
    overwrite: bool = False,
) -> str | None:
    from ..output import atomic_file

    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    xs = [r["damage"] for r in trials] + [budget]
    ys = [r["concept_left"] for r in trials]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    y0, y1 = 0.0, max(ys) * 1.05 or 1.0
    w, h = SIZE

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            MARGIN + (x - x0) / (x1 - x0) * (w - 2 * MARGIN),
            h - MARGIN - (y - y0) / (y1 - y0) * (h - 2 * MARGIN),
        )

    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([MARGIN, MARGIN, w - MARGIN, h - MARGIN], outline="black")
    for i in range(5):
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(fx, 0)
        _, py = at(0, fy)
        d.text((px - 12, h - MARGIN + 6), f"{fx:.2f}", fill="black")
        d.text((8, py - 6), f"{fy:.2f}", fill="black")
    d.text((w / 2 - 90, h - 22), f"damage ({level} level)", fill="black")
    d.text((8, 20), "concept left", fill="black")
    d.text((MARGIN, 6), f"tune: {len(trials)} trials, {len(pareto)} on the front", fill="black")
    bx, _ = at(budget, 0)
    for yy in range(MARGIN, h - MARGIN, 8):
        d.line([bx, yy, bx, yy + 4], fill="orange")
    for r in trials:
        px, py = at(r["damage"], r["concept_left"])
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(160, 160, 160))
    pts = sorted(at(r["damage"], r["concept_left"]) for r in pareto)
    if len(pts) > 1:
        d.line(pts, fill="blue", width=1)
    for px, py in pts:
        d.ellipse([px - 3, py - 3, px + 3, py + 3], fill="blue")
    cx, cy = at(chosen["damage"], chosen["concept_left"])
    d.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], outline="red", width=2)
    with atomic_file(Path(path), [], overwrite, "plot") as tmp:
        img.save(tmp, format="PNG")
    return str(path)

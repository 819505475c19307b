"""Contact sheets: a still PNG to look at what the numbers say. One row per clip: a few frames of
the original, of the patched model, and (for concept prompts) of the original's safe twin, with the
prompt and the judge's reading of each."""

from __future__ import annotations

from pathlib import Path

import torch

from ..output import atomic_file


def _frames(clip: torch.Tensor, which: tuple[int, ...]) -> torch.Tensor:
    """(3, H, W * len(which)) frames side by side, a 1-pixel grey gap between them."""
    parts = []
    for f in which:
        parts += [clip[:, min(f, clip.shape[1] - 1)], torch.zeros_like(clip[:, 0, :, :1])]
    return torch.cat(parts[:-1], -1)


def contact_sheet(
    path: Path,
    judge,
    jobs,
    before: torch.Tensor,
    after: torch.Tensor,
    vb: list[dict],
    va: list[dict],
    twin_clips: torch.Tensor,
    vt: list[dict],
    twin_at: dict,
    per_set: int = 3,
    frames: tuple[int, ...] = (0, 3, 7),
    scale: int = 5,
) -> Path:
    from PIL import Image, ImageDraw

    rows, seen = [], {}
    for i, j in enumerate(jobs):  # the first seed of the first prompts of each set
        if seen.get(j.set, 0) < per_set and (i == 0 or jobs[i - 1].prompt != j.prompt):
            seen[j.set] = seen.get(j.set, 0) + 1
            rows.append(i)
    return write_sheet(
        path,
        [
            (
                f"[{jobs[i].set}] {jobs[i].prompt}",
                [
                    ("original", before[i], judge.describe(vb[i])),
                    ("patched", after[i], judge.describe(va[i])),
                ]
                + (
                    [
                        (
                            f"twin: {jobs[i].twin}",
                            twin_clips[twin_at[(jobs[i].twin, jobs[i].seed)]],
                            judge.describe(vt[twin_at[(jobs[i].twin, jobs[i].seed)]]),
                        )
                    ]
                    if jobs[i].twin is not None
                    else []
                ),
            )
            for i in rows
        ],
        frames,
        scale,
        Image,
        ImageDraw,
    )


def write_sheet(path, rows, frames=(0, 3, 7), scale=5, Image=None, ImageDraw=None) -> Path:
    """ROWS: (title, [(column label, clip (3, F, H, W) in [-1, 1], reading), ...])."""
    if Image is None:
        from PIL import Image, ImageDraw
    ncol = max(len(c) for _t, c in rows)
    sample = rows[0][1][0][1]
    cw = (sample.shape[-1] * len(frames) + len(frames) - 1) * scale
    ch = sample.shape[-2] * scale
    pad, title_h, text_h = 10, 14, 28
    W = pad + ncol * (cw + pad)
    H = pad + len(rows) * (title_h + ch + text_h + pad)
    img = Image.new("RGB", (W, H), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    y = pad
    for title, cols in rows:
        draw.text((pad, y), title, fill=(255, 255, 255))
        y += title_h
        for k, (label, clip, reading) in enumerate(cols):
            x = pad + k * (cw + pad)
            strip = _frames(clip.float(), frames)
            arr = ((strip.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            im = Image.fromarray(arr).resize(
                (arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST
            )
            img.paste(im, (x, y))
            draw.text((x, y + ch + 2), label[:40], fill=(200, 200, 200))
            draw.text((x, y + ch + 14), reading[:40], fill=(255, 220, 120))
        y += ch + text_h + pad
    path = Path(path)
    with atomic_file(path, flag="--sheet", can_overwrite=False) as tmp:
        img.save(tmp, format="PNG")
    return path

"""Generated clips kept as MP4 files, through imageio and the ffmpeg binary that imageio-ffmpeg ships.

Clips are H.264 in 4:4:4 (no chroma subsampling: a small object's colour survives) at a constant
rate factor, by default 0: lossless in YUV, so a decoded clip differs from the generated one only by
the RGB to YUV rounding (at most a few levels of 255). This matters because ``--rejudge`` and the
quality distances work on decoded clips. ``crf`` 18-23 gives the usual visually lossless files at a
fraction of the size. A clip is written under a temporary name and renamed, so a file with the final
name is always complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import VpatchError


class VideoError(VpatchError):
    """A clip cannot be written or read (no ffmpeg, unreadable file)."""


def _imageio():
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
    except ImportError:
        raise VideoError(
            "keeping videos needs imageio and imageio-ffmpeg: pip install 'vpatch[eval]'"
        ) from None
    return iio


def to_uint8(clip: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return (
        ((clip.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)
    )


def from_uint8(frames) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) in [-1, 1]."""
    return torch.as_tensor(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def write_mp4(path: Path, clip: torch.Tensor, fps: int = 8, crf: int = 0) -> Path:
    iio = _imageio()
    path = Path(path)
    frames = to_uint8(clip).numpy()
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise VideoError(f"{path}: H.264 needs even frame sizes, got {frames.shape[1:3]}")
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        w = iio.get_writer(
            name,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv444p",
            macro_block_size=1,
            quality=None,
            ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf))],
        )
        try:
            for f in frames:
                w.append_data(f)
        finally:
            w.close()
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.unlink(name)
    return path


def read_mp4(path: Path) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]."""
    iio = _imageio()
    import numpy as np

    try:
        frames = iio.mimread(str(path), format="FFMPEG", memtest=False)
    except (OSError, RuntimeError) as e:
        raise VideoError(f"{path}: cannot decode ({str(e).splitlines()[0]})") from None
    return from_uint8(np.stack(frames))

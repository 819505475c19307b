"""Denoise-mode capture: run the pipeline on noise latents with pre-hooks on the site Linears.

Used where a site's input depends on the video tokens (joint attention), so the encoder alone
cannot produce it. Builds the whole pipeline (optionally with accelerate's offload) and runs one call
per prompt with the same seed, recording every step's input.
A family whose recipe sets ``denoise.runner = "mmdit_video"`` has no pipeline: its converted single
file is sampled by mmdit_video.py, which returns the same captures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ProbeError
from ..families.recipes import Concept, Family, SiteSpec
from ..merge.engine import Reporter
from . import mmdit_video
from .activations import Capture
from .encoders import import_class
from .sites import Hooks, Target, find_module, hooked_group
from .sources import ModelSource

if TYPE_CHECKING:
    from .capture import CaptureOptions, Raw


def capture_denoise(
    src: ModelSource,
    fam: Family,
    sites: list[SiteSpec],
    targets: dict[str, list[Target]],
    con: Concept,
    opt: CaptureOptions,
    device: str,
    dtype: torch.dtype,
    rep: Reporter,
    say: Callable[[str], None],
) -> Raw:
    """Run the pipeline on noise latents with hooks on the site Linears; one call per prompt, same seed."""
    if fam.denoise.runner == "mmdit_video":  # a converted single file, no pipeline: its own sampler
        return mmdit_video.capture_denoise(
            src, fam, sites, targets, con, opt, device, dtype, rep, say
        )
    pipe = _load_pipeline(src, opt, device, dtype, say)
    call = dict(fam.denoise.call)
    modules: dict[str, torch.nn.Module] = {}
    site_of: dict[str, SiteSpec] = {}
    group_targets: dict[tuple[str, str], list[Target]] = {}
    for site in sites:
        for t in targets[site.name]:
            g = hooked_group(t)
            group_targets.setdefault((site.name, g), []).append(t)
            if g not in modules:
                comp = getattr(pipe, t.component, None)
                if comp is None:
                    raise ProbeError(f"pipeline has no component {t.component!r}")
                modules[g] = find_module(comp, t.module)
                site_of[g] = site

    def select(g: str, x: torch.Tensor) -> torch.Tensor:
        site = site_of[g]
        # the recipes turn guidance off (batch 1); with it on, diffusers batches [uncond, cond]: keep cond
        x = x[-1] if x.dim() == 3 else x
        if site.text_tokens == "all":
            return x
        n = site.text_len if isinstance(site.text_len, int) else int(call.get(site.text_len, 0))
        if n <= 0:
            raise ProbeError(
                f"site {site.name}: text_len {site.text_len!r} is not set in [denoise.call]"
            )
        return x[:n] if site.text_tokens == "first" else x[-n:]

    hooks = Hooks(modules, select)
    # a family's text-to-video pipelines take no image: only the arguments this pipeline has get one
    takes = inspect.signature(pipe.__call__).parameters
    image_args = [n for n in fam.denoise.images if n in takes]

    def run(prompt: str, image: Path | None = None) -> dict[str, list[torch.Tensor]]:
        gen = torch.Generator("cpu").manual_seed(opt.seed)
        kw = {name: conditioning_image(image, call) for name in image_args}
        with torch.inference_mode():
            pipe(
                prompt=prompt,
                num_inference_steps=fam.denoise.steps,
                output_type="latent",
                generator=gen,
                **call,
                **kw,
            )
        rep.advance(1)
        return hooks.take()

    try:
        per_u, per_s = [], []
        for p in con.pairs:
            per_u.append(run(p.unsafe, p.unsafe_image))
            per_s.append(run(p.safe, p.safe_image))
        imgs = list(con.neutral_images)
        per_n = [run(n, imgs[i % len(imgs)] if imgs else None) for i, n in enumerate(con.neutral)]
    finally:
        hooks.remove()
    out: Raw = {}
    for (site_name, g), ts in group_targets.items():
        if not per_u[0][g]:
            raise ProbeError(
                f"site {site_name}: module {g} never ran during the denoise pass; the recipe does not fit this pipeline"
            )
        roles = {
            r: [[Capture.of(x, None) for x in calls[g]] for calls in per]
            for r, per in (("unsafe", per_u), ("safe", per_s), ("neutral", per_n))
        }
        out[(site_name, g)] = (ts, roles)
    return out


def conditioning_image(path: Path | None, call: dict):
    """The image an image-to-video call conditions on: the concept's own, else mid-grey at the call's size
    (the same for both prompts of a pair, so their difference is the text's)."""
    from PIL import Image

    if path is not None:
        with Image.open(path) as im:  # closed here: convert() makes the copy that is used
            return im.convert("RGB")
    size = (int(call.get("width", 512)), int(call.get("height", 512)))
    return Image.new("RGB", size, (128, 128, 128))


def _load_pipeline(
    src: ModelSource,
    opt: CaptureOptions,
    device: str,
    dtype: torch.dtype,
    say: Callable[[str], None],
):
    """The diffusers pipeline on DEVICE (or offloaded as --offload says), progress bars off."""
    if src.single is not None:
        raise ProbeError(
            "denoise-mode sites need a diffusers pipeline folder; original single files can only be probed in text mode"
        )
    DiffusionPipeline = import_class("diffusers", "DiffusionPipeline")
    say(
        f"loading the pipeline for denoise-mode sites on {device} (this builds the denoiser; offload: {opt.offload})"
    )
    if opt.offload != "none" and not device.startswith("cuda"):
        raise ProbeError(
            f"--offload {opt.offload} needs a GPU (it moves weights between the GPU and host memory); use --offload none on CPU"
        )
    kwargs = {"torch_dtype": dtype, "use_safetensors": True}  # never unpickle a component
    if opt.offload == "balanced":  # accelerate spreads the components over every visible GPU
        kwargs["device_map"] = "balanced"
    try:
        pipe = DiffusionPipeline.from_pretrained(src.root, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ProbeError(
            f"{src.root}: diffusers could not load the pipeline ({str(e).splitlines()[0]})"
        ) from None
    if opt.offload == "model":
        pipe.enable_model_cpu_offload(device=device)  # one component on the GPU at a time
    elif opt.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)  # one submodule at a time: least memory
    elif opt.offload == "none":
        pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe

"""Denoise mode for a converted single-file video MMDiT (Open-Sora 2.0) that has no diffusers pipeline.

The weights become a diffusers module by the recipe's ``[convert]`` data (families/conversion.py);
diffusers runs that module, and the probe hooks it there. What is left is a sampling loop, which is
code rather than a table: this module is Open-Sora 2.0's own T2V sampler (opensora/utils/sampling.py,
``I2VDenoiser`` with zero condition), with every number taken from the recipe's ``[denoise.call]``:

- noise (B, C, T, 2*ceil(H/16), 2*ceil(W/16)) from a seeded CPU generator, packed 2x2 into tokens
  t-major; latent frames (F - 1) // 4 + 1 (causal VAE); (t, h, w) position ids, text ids zero;
- the condition input (I2V mask + reference, folded into ``x_embedder``) is zero for text-to-video;
- timesteps t = a*s / (1 + (a - 1)*s), s = linspace(1, 0, steps + 1),
  a = (1 + 2*(tokens per frame - 256)/3840) * sqrt(latent frames); Euler steps x += (t' - t) * v;
- classifier-free guidance over [prompt, negative] (upstream's third pass, negative with zero
  condition, equals the second one when the condition is zero), with its oscillation: from step 10
  on, odd steps use scale 1.
Captured samples are the prompt's half of the batch.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import ProbeError
from ..families.conversion import build_module, one_to_one
from ..families.recipes import Concept, Family, SiteSpec
from ..layouts import AliasRules
from ..merge.engine import Reporter
from ..safetensors_io import TensorReader
from .activations import Capture
from .encoders import Encoder
from .sites import Hooks, Target, find_module, hooked_group
from .sources import ModelSource

if TYPE_CHECKING:
    from .capture import CaptureOptions, Raw


@dataclass(frozen=True)
class Grid:
    """The packed latent: T frames of h x w tokens, each ``channels`` wide (C * patch^2)."""

    frames: int
    rows: int
    cols: int
    latent_channels: int
    patch: int

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols


def grid(call: dict) -> Grid:
    def num(name: str, default: int | None = None) -> int:
        v = call.get(name, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ProbeError(f"[denoise.call] {name} must be a positive integer, got {v!r}")
        return v

    frames = num("num_frames")
    tr, sc, p = num("temporal_reduction", 4), num("spatial_compression", 16), num("patch_size", 2)
    t = 1 if frames == 1 else (frames - 1) // tr + 1
    return Grid(
        t,
        math.ceil(num("height") / sc),
        math.ceil(num("width") / sc),
        num("latent_channels", 16),
        p,
    )


def positions(g: Grid) -> torch.Tensor:
    """(t, h, w) per token, t-major, as Open-Sora's ``prepare``."""
    t, h, w = torch.meshgrid(
        torch.arange(g.frames), torch.arange(g.rows), torch.arange(g.cols), indexing="ij"
    )
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3).float()


def schedule(steps: int, g: Grid, shift: bool = True, alpha: float | None = None) -> list[float]:
    s = torch.linspace(1, 0, steps + 1)
    if shift:
        if alpha is None:
            alpha = (1 + 2 * (g.tokens_per_frame - 256) / 3840) * math.sqrt(g.frames)
        s = alpha * s / (1 + (alpha - 1) * s)
    return s.tolist()


def noise(g: Grid, seed: int, batch: int = 1) -> torch.Tensor:
    p = g.patch
    z = torch.randn(
        batch,
        g.latent_channels,
        g.frames,
        p * g.rows,
        p * g.cols,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    z = z.reshape(batch, g.latent_channels, g.frames, g.rows, p, g.cols, p)
    return z.permute(0, 2, 3, 5, 1, 4, 6).reshape(batch, -1, g.latent_channels * p * p)


def forward(
    model: torch.nn.Module,
    x: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    t: torch.Tensor,
    img_ids: torch.Tensor,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """One velocity prediction in Open-Sora's argument layout (img, txt, y_vec, timesteps, cond)."""
    extra = int(model.config.in_channels) - x.shape[-1]
    if extra < 0:
        raise ProbeError(
            f"latent tokens are {x.shape[-1]} wide but the model reads {model.config.in_channels}"
        )
    if extra:
        if cond is None:
            cond = torch.zeros(*x.shape[:-1], extra, dtype=x.dtype, device=x.device)
        x = torch.cat([x, cond], dim=-1)
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=img_ids.dtype)
    return model(
        hidden_states=x,
        encoder_hidden_states=txt,
        pooled_projections=vec,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
        return_dict=False,
    )[0]


def sample(
    model: torch.nn.Module,
    txt: torch.Tensor,
    vec: torch.Tensor,
    neg: tuple[torch.Tensor, torch.Tensor] | None,
    call: dict,
    steps: int,
    seed: int,
) -> torch.Tensor:
    """Open-Sora's T2V sampling loop; ``txt`` (1, L, D), ``vec`` (1, P); returns the packed latent."""
    g = grid(call)
    dev, dt = txt.device, txt.dtype
    ids = positions(g).to(dev, dt)
    ts = schedule(steps, g, bool(call.get("shift", True)), call.get("flow_shift"))
    x = noise(g, seed).to(dev, dt)
    gs = float(call.get("guidance", 1.0))
    cfg = gs > 1.0 and neg is not None
    if cfg:
        txt, vec = torch.cat([txt, neg[0]]), torch.cat([vec, neg[1]])
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        xb = torch.cat([x, x]) if cfg else x
        tv = torch.full((xb.shape[0],), t0, dtype=dt, device=dev)
        v = forward(model, xb, txt, vec, tv, ids)
        if cfg:
            scale = gs if not call.get("text_osci", False) or i < 10 or i % 2 == 0 else 1.0
            c, u = v.chunk(2)
            v = u + scale * (c - u)
        x = x + (t1 - t0) * v
    return x


# --------------------------------------------------------------------------- the probe's capture


def load_transformer(fam, ws, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, dict]:
    """The single file converted in memory by the recipe's [convert]; returns (module, {canonical
    stored key: stored key})."""
    rules = AliasRules(list(fam.key_prefixes))
    stored = {rules.strip(k)[0]: k for k in ws.key_file}
    readers: dict = {}

    def read(canon: str) -> torch.Tensor:
        key = stored[canon]
        f = ws.key_file[key]
        if f not in readers:
            readers[f] = TensorReader(ws.headers[f])
        return (
            readers[f].tensor(key).to(device)
        )  # converted on the device: no host copy of the model

    try:
        model = build_module(fam.convert, list(stored), read, dtype, device)
    finally:
        for rd in readers.values():
            rd.close()
    return model, stored


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
    """Denoise-mode capture on a converted single file: encode every prompt, free the encoders,
    convert and load the denoiser, sample each prompt with pre-hooks on the site Linears."""
    if src.single is None:
        raise ProbeError(
            f"family {fam.name}: runner {fam.denoise.runner} converts an original single file; this is a folder"
        )
    if opt.offload != "none":
        raise ProbeError(
            f"--offload {opt.offload}: offload drives diffusers pipelines; the converted {fam.name} module "
            "runs whole on one device (use --offload none)"
        )
    call = dict(fam.denoise.call)
    texts = [p.unsafe for p in con.pairs] + [p.safe for p in con.pairs] + list(con.neutral)
    enc_out = {}
    for kind in ("text", "pooled"):
        names = [n for n, e in fam.encoders.items() if e.kind == kind]
        if not names:
            raise ProbeError(f"family {fam.name}: runner mmdit_video needs a {kind} encoder")
        spec = fam.encoders[names[0]]
        say(f"loading encoder {names[0]} on {device}")
        enc = Encoder(spec, src, opt.encoders.get(names[0]), device, dtype)
        got = [x for i in range(0, len(texts), 8) for x, _m in enc(texts[i : i + 8])]
        enc.template = (
            "{}"  # upstream appends FPS and motion score to the prompts, not the negative
        )
        negative = enc([str(call.get("negative", ""))])[0][0]
        enc_out[kind] = (got, negative)
        del enc
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    say(f"converting the single file to {fam.convert.module} on {device}")
    model, stored = load_transformer(fam, src.single, dtype, device)
    modules: dict[str, torch.nn.Module] = {}
    site_of: dict[str, SiteSpec] = {}
    group_targets: dict[tuple[str, str], list[Target]] = {}
    for site in sites:
        for t in targets[site.name]:
            tgt = one_to_one(fam.convert, t.module + ".weight", stored)
            if tgt is None:
                raise ProbeError(
                    f"site {site.name}: {t.key} is split, folded or permuted by the conversion, so an "
                    "edit of the converted weight is not the same edit of the stored one"
                )
            g = hooked_group(t)
            group_targets.setdefault((site.name, g), []).append(t)
            if g not in modules:
                modules[g] = find_module(model, tgt.removesuffix(".weight"))
                site_of[g] = site
    # with guidance the batch is [prompt, negative]: keep the prompt's half
    hooks = Hooks(modules, lambda _g, x: x[0] if x.dim() == 3 else x)

    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype).unsqueeze(0)

    neg = (to(enc_out["text"][1]), to(enc_out["pooled"][1].reshape(-1)))
    per: list[dict[str, list[torch.Tensor]]] = []
    try:
        for i in range(len(texts)):
            txt, vec = enc_out["text"][0][i], enc_out["pooled"][0][i].reshape(-1)
            with torch.inference_mode():
                sample(model, to(txt), to(vec), neg, call, fam.denoise.steps, opt.seed)
            per.append(hooks.take())
            rep.advance(1)
    finally:
        hooks.remove()
    n = len(con.pairs)
    by_role = {"unsafe": per[:n], "safe": per[n : 2 * n], "neutral": per[2 * n :]}
    out: Raw = {}
    for (site_name, g), ts in group_targets.items():
        if not by_role["unsafe"][0][g]:
            raise ProbeError(f"site {site_name}: module {g} never ran during sampling")
        roles = {
            r: [[Capture.of(x, None) for x in calls[g]] for calls in prompts]
            for r, prompts in by_role.items()
        }
        out[(site_name, g)] = (ts, roles)
    return out

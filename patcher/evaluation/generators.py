"""Generators: a model folder in, clips out as (N, 3, F, H, W) float32 on the CPU in [-1, 1].

A generator is one class taking (folder, options); ``options.device`` and ``options.dtype`` place
and cast the model. The initial noise is drawn on the CPU in float32 from each sample's seed, so the
same seed gives the same starting noise on every device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VpatchError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GeneratorError(VpatchError):
    """The generator cannot run as asked (unknown dtype, device not available)."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise GeneratorError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise GeneratorError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GeneratorError(f"--device {device}: CUDA is not available on this machine")
    return dev


class OrganismGenerator:
    """The shipped organism's own rectified-flow sampler (``organism.sample``)."""

    def __init__(self, folder: Path, opt):
        from .. import organism

        self.o = organism
        dev, dt = check_device(opt.device), torch_dtype(opt.dtype)
        tok, enc, tr = organism.load(folder)
        self.models = (tok, enc.to(dev, dt), tr.to(dev, dt))
        self.opt = opt

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.o.sample(
            *self.models, prompts, seeds, steps=self.opt.steps, guidance=self.opt.guidance
        )


class PipelineGenerator:
    """Any diffusers text-to-video pipeline."""

    def __init__(self, folder: Path, opt):
        from diffusers import DiffusionPipeline

        dev, dt = check_device(opt.device), torch_dtype(opt.dtype)
        self.pipe = DiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=dt, use_safetensors=True
        ).to(dev)
        self.pipe.set_progress_bar_config(disable=True)
        self.opt = opt

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = []
        for p, s in zip(prompts, seeds):
            fr = self.pipe(
                prompt=p,
                num_inference_steps=self.opt.steps,
                generator=torch.Generator().manual_seed(s),
                output_type="pt",
                **self.opt.call,
            ).frames
            v = torch.as_tensor(fr[0]).float().cpu()  # (F, 3, H, W) in [0, 1]
            out.append(v.permute(1, 0, 2, 3) * 2 - 1)
        return torch.stack(out)


def generator_for(folder: Path):
    from .. import organism

    return OrganismGenerator if organism.is_organism(folder) else PipelineGenerator

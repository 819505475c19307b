"""The ``vpatch`` command: a thin click shell over the Python API.

Results go to stdout (``--json`` for machines); progress, tables and warnings go to stderr.
A ``VpatchError`` is printed on one line with exit code 2 and no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .errors import ProbeError, VpatchError
from .inspection import inspect_path
from .merge.engine import Report, apply_delta, revert_delta
from .output import Terminated

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


class RichReporter:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._p: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        if self.quiet:
            return
        self._p = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except VpatchError as e:
            msg = " ".join(str(e).split())
            click.echo(f"vpatch: {type(e).__name__}: {msg}", err=True)
            plan = getattr(e, "plan", None)
            if plan is not None:  # the details, after the message (a script reads the first line)
                _coverage_table(plan.coverage())
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("vpatch: interrupted; no output was written", err=True)
            sys.exit(130)
        except Terminated as e:  # SIGTERM / SIGHUP during a write: temporaries already removed
            click.echo(f"vpatch: stopped by signal {e.signum}; no output was written", err=True)
            sys.exit(128 + e.signum)

    return wrapper


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _coverage_table(cov: dict) -> None:
    err.print(f"coverage: {cov['matched']}/{cov['expected']} entries matched ({cov['how']})")
    for k in cov["missing"][:20]:
        err.print(f"  missing  {k}")
    for k in cov["shape_mismatch"][:20]:
        err.print(f"  shape    {k}")
    if cov["other_component"]:
        err.print(
            f"  {len(cov['other_component'])} entries belong to other components and were not considered"
        )


def _show_report(r: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        _coverage_table(r.coverage)
        if r.tensors:
            t = Table(
                title=f"{r.action}: {r.concept} (delta {r.delta_sha256[:12]})", show_lines=False
            )
            t.add_column("tensor", overflow="fold")
            for c in ("dtype", "fingerprint", "edit kept", "changed"):
                t.add_column(c)
            for s in r.tensors:
                fp = (
                    {True: "base", False: "differs", None: "-"}[s.base_match]
                    if r.action == "apply"
                    else {True: "exact", False: "inexact", None: "-"}[s.exact]
                )
                t.add_row(
                    s.key,
                    s.dtype,
                    fp,
                    f"{max(0.0, 1 - s.rounding_error):.1%}",
                    f"{s.changed_fraction:.1%}",
                )
            err.print(t)
        elif r.planned:
            t = Table(title=f"plan: {r.concept} (delta {r.delta_sha256[:12]})")
            t.add_column("tensor", overflow="fold")
            for c in ("kind", "rank", "dtype", "fingerprint"):
                t.add_column(c)
            for p in r.planned:
                t.add_row(p["key"], p["kind"], str(p["rank"]), p["dtype"], p["fingerprint"])
            err.print(t)
            err.print(
                f"bytes to write: {_mib(r.bytes_total)} ({_mib(r.bytes_edited)} edited, the rest copied byte for byte); "
                f"estimated peak memory: {_mib(r.peak_estimate)}"
            )
        if r.output:
            click.echo(r.output)
    for w in r.warnings:
        err.print(Text.assemble(("warning:", "yellow"), " ", w))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vpatch")
def main() -> None:
    """Remove a concept from a text-to-video model by a low-rank edit baked into its weights.

    \b
    Typical use:
      vpatch probe MODEL -c nudity -o concept.vud  find the concept's direction (needs [probe])
      vpatch build ACTS -o other.vud --strength 1.5  another delta from saved activations
      vpatch inspect concept.vud                  what a delta edits
      vpatch apply MODEL concept.vud              merge it (streaming, weights only) next to MODEL
      vpatch inspect MODEL-no-nudity              which deltas a checkpoint carries
      vpatch merge a.vud b.vud -o ab.vud          several concepts in one delta
      vpatch export concept.vud --base MODEL -o erase.safetensors   the same edit as a LoRA

    MODEL is a .safetensors file, a sharded *.safetensors.index.json, a component folder or a
    diffusers pipeline folder. Exit code 2 means bad input; the message says how to fix it.
    """


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("delta", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Output file (single-file input) or folder (others). Must not exist. Default: next to the input, named after it and the concept (model.no-nudity.safetensors, wan-no-nudity/; a hub id: in the current folder).",
)
@click.option(
    "--strength",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiplies each entry's probed strength λ (1.0 = as probed, 0 = no edit).",
)
@click.option(
    "--component",
    help="Which of the delta's components a bare file or folder is (e.g. transformer_2); inferred from keys when omitted.",
)
@click.option(
    "--use-factors",
    is_flag=True,
    help="For projection entries, add the probed U Vᵀ as is instead of recomputing U from this checkpoint's own weights.",
)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Patch what matches even when some entries find no tensor (reported).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Apply even if the checkpoint already carries this delta (compounds the edit).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a previous vpatch output (never an input, a delta or weights vpatch did not write).",
)
@click.option(
    "--revert-record",
    type=click.Path(path_type=Path),
    help="Also write a private record that makes `vpatch revert` bit-exact. Never publish it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (tensors, bytes, peak memory) and write nothing.",
)
@click.option("--revision", help="Hub branch, tag or commit when CHECKPOINT is a hub id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def apply(
    checkpoint,
    delta,
    out,
    strength,
    component,
    use_factors,
    allow_partial,
    force,
    overwrite,
    revert_record,
    dry_run,
    revision,
    as_json,
    quiet,
):
    """Merge DELTA (.vud) into CHECKPOINT and write the patched copy (to -o, or next to the input).

    Untouched tensors are copied byte for byte; edited ones are computed in fp32 and written in
    their stored dtype (fp8 weights are dequantized with their scale and requantized with it). The
    write is atomic: an interrupted run leaves no finished-looking file.

    CHECKPOINT is a local file or folder, or a hub id: owner/name (the whole repo's safetensors
    weights and configs, never pickles) or owner/name:PATH (one file, index or component folder).
    Delta keys are diffusers names; single-file prefixes, original layouts and fused QKV tensors
    are resolved by the family recipe's [aliases] (see `vpatch inspect CHECKPOINT --delta D`).

    \b
    Examples:
      vpatch apply model.safetensors nudity.vud          (writes model.no-nudity.safetensors)
      vpatch apply wan/ nudity.vud -o wan-safe/
      vpatch apply Wan-AI/Wan2.1-T2V-1.3B-Diffusers nudity.vud -o wan-safe/
      vpatch apply wan2.1_t2v_1.3B_fp8_scaled.safetensors nudity.vud -o wan-safe.safetensors
      vpatch apply transformer/diffusion_pytorch_model.safetensors nudity.vud -o safe.safetensors
      vpatch apply model.safetensors nudity.vud --dry-run
    """
    r = apply_delta(
        checkpoint,
        delta,
        out,
        strength=strength,
        component=component,
        use_factors=use_factors,
        allow_partial=allow_partial,
        force=force,
        overwrite=overwrite,
        dry_run=dry_run,
        revert_record=revert_record,
        reporter=RichReporter(quiet or as_json),
        revision=revision,
    )
    _show_report(r, as_json)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("delta", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output file or folder. Must not exist.",
)
@click.option(
    "--record",
    type=click.Path(path_type=Path),
    help="The file written by `apply --revert-record`: makes the revert bit-exact.",
)
@click.option("--component", help="As for apply.")
@click.option(
    "--allow-inexact",
    is_flag=True,
    help="Keep the result even where rounding left it off the original fingerprint.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a previous vpatch output (never an input, a delta or weights vpatch did not write).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def revert(checkpoint, delta, out, record, component, allow_inexact, overwrite, as_json, quiet):
    """Undo DELTA on a CHECKPOINT patched by `vpatch apply`.

    Each restored tensor is checked against the original's sha256. With --record the restore is
    bit-exact; without it, the inverse edit is computed and rounding usually leaves a few elements
    off, which is an error unless --allow-inexact.
    """
    r = revert_delta(
        checkpoint,
        delta,
        out,
        component=component,
        record=record,
        allow_inexact=allow_inexact,
        overwrite=overwrite,
        reporter=RichReporter(quiet or as_json),
    )
    _show_report(r, as_json)


class CountReporter(RichReporter):
    """Progress in items (prompts), not bytes."""

    def start(self, description: str, total: int) -> None:
        if self.quiet:
            return
        self._p = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total)


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint=flag)
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _method_options(fn):
    """The method parameters, shared by `probe` and `build`; ProbeParams checks them (once)."""
    from .erasure.refusal import POOLINGS
    from .probe.build import METHODS

    opts = [
        click.option(
            "--method",
            metavar="NAME",
            help=f"How directions are found: {', '.join(METHODS)}. cpca: the refusal vector kept by the "
            "contrastive subspace of C_diff − α·C_neutral; pca: the same with α = 0; mean: the raw mean "
            "difference; twin: a closed-form input-side map that sends the concept's tokens to its safe "
            "twin's, with a preservation set (text-mode sites). Default: the family recipe's (cpca).",
        ),
        click.option(
            "--rank",
            type=int,
            help="k ≥ 1: the subspace size for pca/cpca (paper: 100; capped at the input width).",
        ),
        click.option("--alpha", type=float, help="α ≥ 0 in C = C_diff − α·C_neutral (cpca only)."),
        click.option(
            "--strength",
            type=float,
            help="λ > 0 in W' = W − λ (W u) uᵀ; 1 removes the direction exactly.",
        ),
        click.option(
            "--directions",
            type=int,
            help="m ≥ 1: how many orthonormal refusal directions to remove.",
        ),
        click.option(
            "--pooling",
            metavar="MODE",
            help=f"How a prompt's tokens become samples: {', '.join(POOLINGS)} (see recipes/README.md).",
        ),
        click.option(
            "--beta",
            type=float,
            default=1.0,
            show_default=True,
            help="twin: β ≥ 0, the preservation set's weight against the concept pairs.",
        ),
        click.option(
            "--ridge",
            type=float,
            default=1e-3,
            show_default=True,
            help="twin: pull toward the identity, relative to the preservation tokens' scale.",
        ),
        click.option(
            "--null",
            type=int,
            default=0,
            show_default=True,
            help="twin: concept null-space directions that no input reaches afterwards (docs/erasure.md).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _params(method, rank, alpha, strength, directions, pooling, beta, ridge, null):
    from .probe import ProbeParams

    return ProbeParams(method, rank, alpha, strength, directions, pooling, beta, ridge, null)


def _show_probe(r, as_json: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    if r.delta is None:  # capture only
        t = Table(title=f"{verb}: captured {r.concept} on {r.family}")
        for c in ("site", "input", "width", "prompts", "tokens", "targets"):
            t.add_column(c, overflow="fold")
        for g in r.groups:
            t.add_row(
                g["site"],
                g["input"],
                str(g["dim"]),
                "/".join(str(n) for n in g["prompts"].values()),
                "/".join(str(n) for n in g["tokens"].values()),
                str(len(g["targets"])),
            )
        err.print(t)
        err.print(
            f"build deltas from it with: vpatch build {r.activations} -o DELTA.vud [--strength ...]"
        )
        click.echo(r.activations)
        return
    m = r.method
    t = Table(
        title=f"{verb}: {r.concept} on {r.family} ({m['name']}, k={m['rank']}, α={m['alpha']:g}, λ={m['strength']:g})"
    )
    for c in ("site", "input", "width", "samples", "r kept", "targets"):
        t.add_column(c, overflow="fold")
    for g in r.groups:
        t.add_row(g.site, g.input, str(g.dim), str(g.samples), f"{g.kept:.0%}", str(len(g.targets)))
    err.print(t)
    if r.activations:
        err.print(f"activations saved to {r.activations}")
    click.echo(r.delta)


@main.command()
@click.argument("model")
@click.option(
    "-c",
    "--concept",
    "concepts",
    required=True,
    multiple=True,
    help="Concept recipe: a shipped name (nudity, violence, gore, trademark) or a .toml path. "
    "Repeat it (-c nudity -c gore) to remove several concepts with one delta.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="The .vud delta to write (may be left out with --save-activations).",
)
@click.option(
    "--save-activations",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Also save what the sites read (safetensors), to build more deltas later with `vpatch build`.",
)
@click.option(
    "--family",
    help="Model family recipe (name or .toml path); detected from model_index.json or keys when omitted.",
)
@click.option(
    "--layers",
    "sites",
    help="Comma-separated edit sites of the family recipe, replacing its defaults (see `vpatch families`).",
)
@click.option(
    "--layer-filter",
    help="Regular expression: keep only target keys it matches, e.g. 'blocks\\.(2[0-9])\\.'.",
)
@_method_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Encoder/pipeline dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
)
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    metavar="NAME=PATH",
    help="Use this local folder or hub id for a recipe encoder (original single-file models need it).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a family-recipe field, e.g. --set denoise.steps=2.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Noise seed for denoise-mode sites (same for both prompts of a pair).",
)
@click.option(
    "--offload",
    default="none",
    show_default=True,
    metavar="MODE",
    help="Denoise mode on a model too big for the GPU: none, model or sequential (accelerate's CPU "
    "offload), or balanced (a device_map over all GPUs).",
)
@click.option("--revision", help="Hub revision when MODEL is a hub id.")
@click.option(
    "--overwrite", is_flag=True, help="Replace existing files at -o and --save-activations."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def probe(
    model,
    concepts,
    out,
    save_activations,
    family,
    sites,
    layer_filter,
    method,
    rank,
    alpha,
    strength,
    directions,
    pooling,
    beta,
    ridge,
    null,
    device,
    dtype,
    encoders,
    sets,
    seed,
    offload,
    revision,
    overwrite,
    as_json,
    quiet,
):
    """Find the concept's refusal direction in MODEL and write a portable delta (.vud).

    MODEL is a diffusers pipeline folder, a hub id, or an original single .safetensors file
    (Open-Sora). Text-mode sites run only the text/image encoder; denoise-mode sites run the
    pipeline on noise latents. The delta is then merged with `vpatch apply`.

    A probe is a capture (running the model, the slow part) and a build (the direction math, fast).
    --save-activations keeps the capture, so other --strength/--rank/--alpha/--method values cost a
    `vpatch build` each, not another capture.

    \b
    Examples:
      vpatch probe Wan-AI/Wan2.1-T2V-1.3B-Diffusers -c nudity -o nudity.vud
      vpatch probe ./cogvideox -c gore -o gore.vud --layers text_proj,t5_ffn --rank 64
      vpatch probe Open_Sora_v2.safetensors -c trademark -o tm.vud --encoder text=./t5-xxl --encoder pooled=./clip-l
      vpatch probe ./wan -c nudity --save-activations nudity.acts.safetensors   # capture only
      vpatch probe ./wan -c nudity -c gore -o both.vud     # one joint projection for both
    """
    from .probe import CaptureOptions, probe_concepts
    from .probe import probe as run_probe

    if out is None and save_activations is None:
        raise ProbeError(
            "probe: nothing to write; give -o DELTA.vud, --save-activations FILE or both"
        )
    params = _params(method, rank, alpha, strength, directions, pooling, beta, ridge, null)
    opt = CaptureOptions(
        family=family,
        sites=tuple(s.strip() for s in sites.split(",") if s.strip()) if sites else None,
        layers=layer_filter,
        device=device,
        dtype=dtype,
        seed=seed,
        overrides=tuple(sets),
        encoders=_pairs(encoders, "--encoder"),
        revision=revision,
        offload=offload,
    )
    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    if len(concepts) > 1:
        if save_activations is not None or out is None:
            raise ProbeError(
                "probe: --save-activations takes one concept; save each concept's activations in "
                "its own run, or give -o to write one delta for all of them"
            )
        r = probe_concepts(
            model,
            list(concepts),
            out,
            opt,
            params,
            overwrite=overwrite,
            reporter=CountReporter(quiet or as_json),
            log=say,
        )
        _show_probe(r, as_json, "probe")
        return
    r = run_probe(
        model,
        concepts[0],
        out,
        opt,
        params,
        save_activations=save_activations,
        overwrite=overwrite,
        reporter=CountReporter(quiet or as_json),
        log=say,
    )
    _show_probe(r, as_json, "probe")


@main.command()
@click.argument("activations", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="The .vud delta to write."
)
@_method_options
@click.option(
    "--model",
    help="Read the base weights from here (default: the model the activations were captured from, "
    "as recorded in them); it must hold the very same target weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing delta file at -o.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def build(
    activations,
    out,
    method,
    rank,
    alpha,
    strength,
    directions,
    pooling,
    beta,
    ridge,
    null,
    model,
    overwrite,
    as_json,
):
    """Build a delta from saved activations, with any method parameters, without running a model.

    ACTIVATIONS is a file written by `vpatch probe ... --save-activations FILE`. Unset parameters
    take the family recipe's defaults, as in `probe`. The base weights W (the edit is
    U = −λ W B) are read from the captured model and checked against the fingerprints taken at
    capture, so a delta is never built on other weights than the directions came from.

    \b
    Examples:
      vpatch probe ./wan -c nudity --save-activations nudity.acts.safetensors
      vpatch build nudity.acts.safetensors -o nudity-l12.vud --strength 1.2
      vpatch build nudity.acts.safetensors -o nudity-k16.vud --rank 16 --alpha 0.5
    """
    from .output import check_target
    from .probe import WeightReader, read_activations, report
    from .probe import build as run_build
    from .vud.delta import write_delta

    params = _params(method, rank, alpha, strength, directions, pooling, beta, ridge, null)
    check_target(out, [activations], overwrite, "delta")
    acts = read_activations(activations)
    built = run_build(acts, params, WeightReader.for_activations(acts, model))
    digest = write_delta(out, built.delta, overwrite=overwrite)
    _show_probe(report(built, acts, out, digest), as_json, "build")


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option(
    "-c",
    "--concept",
    help="Concept recipe (name or .toml) with held-out prompts and [judge.*] labels.",
)
@click.option(
    "--delta",
    type=click.Path(path_type=Path),
    help="The .vud to evaluate; it is applied to a temporary copy of MODEL.",
)
@click.option(
    "--patched",
    type=click.Path(path_type=Path),
    help="Or: an already patched folder (from `vpatch apply`).",
)
@click.option(
    "--judge",
    default="organism",
    show_default=True,
    help="organism: the analytic judge of the shipped organism; clip: CLIP zero-shot against the concept's labels "
    "(and twin fidelity in CLIP image space); nudenet: the NudeNet detector (needs --out; "
    "pip install 'vpatch[nudenet]'); or any judge registered in patcher.evaluation.judges.",
)
@click.option("--clip-model", help="CLIP model folder or hub id for --judge clip.")
@click.option(
    "--seeds",
    type=int,
    default=4,
    show_default=True,
    help="Samples per prompt (same seeds before and after).",
)
@click.option("--steps", type=int, default=16, show_default=True, help="Sampling steps.")
@click.option(
    "--guidance",
    type=float,
    default=3.0,
    show_default=True,
    help="Classifier-free guidance (organism sampler).",
)
@click.option(
    "--strength",
    type=float,
    default=1.0,
    show_default=True,
    help="Passed to apply when --delta is given.",
)
@click.option(
    "--preview",
    type=click.Path(path_type=Path),
    help="Write a before/after GIF here (rows: prompts; left original, right patched).",
)
@click.option(
    "--sheet",
    type=click.Path(path_type=Path),
    help="Write a contact sheet PNG here (rows: clips; original, patched and the safe twin's original).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the models generate (cpu, cuda, cuda:1); with --out, the device accelerate gives each process.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Generation dtype of a diffusers pipeline (the organism samples in float32 with --out; the judge always "
    "reads float32 clips).",
)
@click.option(
    "--call",
    "calls",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra pipeline arguments for real models, e.g. --call num_frames=17 --call height=256.",
)
@click.option(
    "--attack",
    "attack",
    type=click.Choice(["prompts", "embedding"]),
    help="Instead of the standard comparison, attack the edit (organism only): prompts = rewordings "
    "from the concept's vocabulary; embedding = concept inversion of the conditioning sequence.",
)
@click.option(
    "--attack-iterations",
    type=int,
    default=150,
    show_default=True,
    help="Adam steps of the embedding attack.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Keep every clip as MP4 and every result as a JSONL row in this folder; write report.<judge>.md/.json "
    "and a contact sheet there. Runs on N processes under `accelerate launch`.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="A prompt file (.txt, .csv, .jsonl) with an optional category/aspect column (needs --out). "
    "Default: the concept recipe's sets.",
)
@click.option(
    "--free-category",
    "free_categories",
    multiple=True,
    help="A concept-free category of --prompts (quality distances; not in the concept totals). Default: free, neutral.",
)
@click.option(
    "--resume", is_flag=True, help="Finish the run in --out: skip the clips it already holds."
)
@click.option(
    "--rejudge",
    is_flag=True,
    help="Score the clips kept in --out with --judge, without generating again.",
)
@click.option(
    "--batch",
    type=int,
    default=16,
    show_default=True,
    help="(prompt, seed) jobs per generation call (--out).",
)
@click.option(
    "--crf",
    type=int,
    default=0,
    show_default=True,
    help="H.264 rate factor of the kept clips: 0 is lossless in YUV 4:4:4; 18-23 are far smaller.",
)
@click.option(
    "--frame-stride",
    type=int,
    default=1,
    show_default=True,
    help="Judge every k-th frame (nudenet).",
)
@click.option("--nudenet-threshold", type=float, help="NudeNet score threshold [default: 0.6].")
@click.option(
    "--nudenet-classes",
    help="Comma-separated NudeNet classes that count [default: the five explicit *_EXPOSED classes].",
)
@click.option("--json", "as_json", is_flag=True, help="The full report on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def eval_cmd(
    model,
    concept,
    delta,
    patched,
    judge,
    clip_model,
    seeds,
    steps,
    guidance,
    strength,
    preview,
    sheet,
    device,
    dtype,
    calls,
    out,
    prompts_file,
    free_categories,
    resume,
    rejudge,
    batch,
    crf,
    frame_stride,
    nudenet_threshold,
    nudenet_classes,
    attack,
    attack_iterations,
    as_json,
    quiet,
):
    """Measure a delta: concept presence before and after, and what else changed.

    Generates the concept's probe and held-out prompts (paraphrases, synonyms, unseen prompts, a new
    template) and concept-free prompts with the original and the patched model, same prompts and
    seeds, and judges every clip. Reports how often the concept is shown, a trace of it, or the safe
    twin's outcome; twin fidelity (the fraction of the distance to what the original model draws for
    the safe twin, same seed, that the edit closes); concept-free drift against the seed floor; and
    per-kind collateral shifts and texture. Rates and shifts carry 95% intervals.

    With --out, every clip is kept as MP4 and every result as a JSONL row (resumable), prompts can
    come from a benchmark file with categories, and the run spreads over all processes of
    `accelerate launch`.

    \b
    Example (the shipped organism):
      vpatch eval examples/organism/model -c examples/organism/red.toml --delta red.vud --preview red.gif
      vpatch eval examples/organism/model -c examples/organism/red.toml --delta red.vud --out runs/red
    """
    from .evaluation.core import EvalError, EvalOptions, evaluate, summary_rows, to_json
    from .families.recipes import apply_overrides

    call = apply_overrides({}, list(calls))
    if attack and out is not None:
        raise EvalError(
            "--attack compares the original and the patched model in memory; drop --out"
        )
    if out is not None:
        for flag, v in (
            ("--preview", preview),
            ("--sheet", sheet),
            ("--device", device != "cpu"),
        ):
            if v:
                raise EvalError(
                    f"{flag} does not apply with --out: the folder gets its own contact sheet, and "
                    "each process generates on the device `accelerate launch` gives it"
                )
        return _eval_folder(
            model, concept, delta, patched, judge, clip_model, seeds, steps, guidance, strength,
            call, out, prompts_file, free_categories, resume, rejudge, batch, crf, frame_stride,
            nudenet_threshold, nudenet_classes, as_json, quiet, dtype,
        )  # fmt: skip
    for flag, v in (
        ("--prompts", prompts_file),
        ("--resume", resume),
        ("--rejudge", rejudge),
        ("--judge nudenet", judge == "nudenet"),
    ):
        if v:
            raise EvalError(f"{flag} needs --out DIR (the folder that keeps the clips and rows)")
    if model is None or concept is None:
        raise EvalError("give MODEL and -c CONCEPT")
    opt = EvalOptions(
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        judge=judge,
        clip_model=clip_model,
        strength=strength,
        preview=preview,
        sheet=sheet,
        device=device,
        dtype=dtype,
        call=call,
    )
    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    if attack:
        from .evaluation.attacks import attack_eval

        a = attack_eval(
            model,
            concept,
            delta=delta,
            patched=patched,
            attack=attack,
            options=opt,
            iterations=attack_iterations,
        )
        if as_json:
            click.echo(json.dumps(a.to_dict(), indent=2))
            return

        def fmt(x: dict) -> str:
            return f"{100 * x['rate']:.0f}% [{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}]"

        t = Table(title=f"attack {a.attack}: concept shown ({a.n} clips, 95% Wilson intervals)")
        for c in ("original", "patched"):
            t.add_column(c, no_wrap=True)
        t.add_row(fmt(a.before), fmt(a.after))
        Console(highlight=False).print(t)
        return
    r = evaluate(
        model,
        concept,
        delta=delta,
        patched=patched,
        options=opt,
        reporter=CountReporter(quiet or as_json),
        log=say,
    )
    if as_json:
        click.echo(to_json(r))
        return
    t = Table(title=f"eval: {r.concept} ({r.judge} judge, {r.seeds} seeds per prompt)")
    t.add_column("", overflow="fold", min_width=40)
    for c in ("original", "patched", "change"):
        t.add_column(c, no_wrap=True)
    for row in summary_rows(r):
        t.add_row(*row)
    Console(highlight=False, markup=False, width=max(Console().width, 120)).print(t)
    if r.preview:
        click.echo(f"preview: {r.preview}")
    if r.sheet:
        click.echo(f"contact sheet: {r.sheet}")


def _eval_folder(
    model, concept, delta, patched, judge, clip_model, seeds, steps, guidance, strength, call, out,
    prompts_file, free_categories, resume, rejudge, batch, crf, frame_stride, nudenet_threshold,
    nudenet_classes, as_json, quiet, dtype="float32",
):  # fmt: skip
    """`vpatch eval --out`: the API's evaluate_folder, its progress, and its table."""
    from .evaluation.prompt_files import FREE_CATEGORIES
    from .evaluation.report import table_rows
    from .evaluation.scale import RunOptions, evaluate_folder

    opt = RunOptions(
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        call=tuple(sorted(call.items())),
        judge=judge,
        clip_model=clip_model,
        threshold=nudenet_threshold,
        classes=tuple(c.strip() for c in nudenet_classes.split(",")) if nudenet_classes else None,
        frame_stride=frame_stride,
        batch=batch,
        dtype=dtype,
        crf=crf,
        strength=strength,
        free_categories=tuple(free_categories) or FREE_CATEGORIES,
    )
    rep_ = CountReporter(quiet or as_json)
    started = []

    def progress(done: int, total: int) -> None:
        if not started:
            rep_.start("rejudging" if rejudge else "generating", total)
            started.append(1)
        rep_.advance(1)

    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    try:
        r = evaluate_folder(
            model,
            out,
            concept=concept,
            prompts=prompts_file,
            delta=delta,
            patched=patched,
            options=opt,
            resume=resume,
            rejudge_only=rejudge,
            progress=progress,
            log=say,
        )
    finally:
        if started:
            rep_.stop()
    if r is None:  # not the main process
        return
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        return
    t = Table(
        title=f"eval: {r['prompts']['source']} ({r['judge']} judge, {r['seeds']} seeds per prompt)"
    )
    t.add_column("", overflow="fold", min_width=40)
    for c in ("original", "patched", "change"):
        t.add_column(c, no_wrap=True)
    for row in table_rows(r):
        t.add_row(*row)
    Console(stderr=True, highlight=False, width=max(Console().width, 140)).print(t)
    click.echo(r["files"]["md"])


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target repository, user/name.")
@click.option(
    "--base-model",
    help="Hub id (or local folder) of the model that was patched: the card's base_model; its license is inherited.",
)
@click.option(
    "--delta",
    type=click.Path(path_type=Path),
    help="The .vud that was applied: its method and parameters go into the card. It is never uploaded.",
)
@click.option(
    "--eval-report",
    type=click.Path(path_type=Path),
    help="`vpatch eval --json` output: its table goes into the card.",
)
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--exist-ok", is_flag=True, help="Upload into an existing repository.")
@click.option(
    "--stage",
    type=click.Path(path_type=Path),
    help="Where to stage the upload (default: FOLDER.push-staged).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Write the staged folder and the card, list what would be uploaded, upload nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def push(
    folder, repo_id, base_model, delta, eval_report, private, exist_ok, stage, dry_run, as_json
):
    """Publish a patched folder to the Hugging Face Hub with a model card that says what was done.

    The card carries base_model (relation: merge), the inherited license, tags, what was removed,
    the method and the delta hash, the eval table when given, and a plain statement of limits.
    A delta or revert record inside FOLDER is refused: either would let anyone undo the edit.

    \b
    Example:
      vpatch push wan-safe/ --repo-id me/wan-no-nudity --base-model Wan-AI/Wan2.1-T2V-14B-Diffusers \\
        --delta nudity.vud --eval-report eval.json --dry-run
    """
    from .push import push as run_push

    r = run_push(
        folder,
        repo_id,
        base_model=base_model,
        delta=delta,
        eval_report=eval_report,
        private=private,
        dry_run=dry_run,
        stage=stage,
        exist_ok=exist_ok,
    )
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    err.print(
        f"{'would upload' if dry_run else 'uploaded'} {len(r.files)} files from {r.staged} to {r.repo_id}; card: {r.card}"
    )
    click.echo(r.url or r.staged)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The .safetensors file to write.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Required: you trust the file's source (it is unpickled with weights_only=True).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output (never the input).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def convert(src, out, trust_pickle, overwrite, as_json):
    """Convert a pickle checkpoint (.bin/.pt/.ckpt) to safetensors, explicitly.

    Loads with torch.load(weights_only=True), which refuses arbitrary objects; unwraps training
    checkpoints (state_dict, model, module, ema); keeps each tensor's dtype; lists and drops
    non-tensor entries. The source's sha256 is recorded in the output's metadata.
    """
    from .convert import convert_pickle

    r = convert_pickle(src, out, trust_pickle=trust_pickle, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    if r["skipped"]:
        err.print(f"left out {len(r['skipped'])} non-tensor entries: {', '.join(r['skipped'][:8])}")
    err.print(f"{r['tensors']} tensors, {_mib(r['bytes'])}")
    click.echo(r["output"])


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@_user_errors
def families(as_json):
    """List the model-family recipes, their edit sites and defaults."""
    from .families.recipes import family_files, load_family

    rows = []
    for f in family_files():
        fam = load_family(f)
        rows.append(
            {
                "family": fam.name,
                "description": fam.description,
                "default_sites": fam.default_sites,
                "sites": {
                    n: {"mode": s.mode, "components": s.components, "why": " ".join(s.why.split())}
                    for n, s in fam.sites.items()
                },
                "aliases": {
                    "prefixes": fam.key_prefixes,
                    "layouts": sorted({r.layout for r in fam.key_renames}),
                    "fused": sorted(
                        {r.stored.rsplit(".", 2)[-2] for r in fam.key_renames if r.split}
                    ),
                },
                "path": str(f),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="model families (recipes/models)")
    for c in ("family", "sites (default first)", "mode", "apply also reads"):
        t.add_column(c, overflow="fold")
    for r in rows:
        names = r["default_sites"] + [n for n in r["sites"] if n not in r["default_sites"]]
        al = r["aliases"]
        also = ", ".join(
            [
                *(f"{x} layout" for x in al["layouts"]),
                *(f"fused {x}" for x in al["fused"]),
                *(f"prefix {x}" for x in al["prefixes"]),
            ]
        )
        t.add_row(
            r["family"],
            ", ".join(names),
            ", ".join(sorted({s["mode"] for s in r["sites"].values()})),
            also or "-",
        )
    Console(highlight=False, markup=False).print(t)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--delta",
    type=click.Path(path_type=Path),
    help="Show how each entry of this .vud resolves against the checkpoint PATH.",
)
@click.option("--component", help="With --delta: which component a bare file or folder is.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@_user_errors
def inspect(path, delta, component, as_json):
    """Show what a .vud delta edits, or what a checkpoint holds and which deltas it carries.

    With --delta, show for every delta entry the tensor it resolves to (file, dtype), whether that
    tensor is the exact one the delta was probed from, or why it does not resolve.
    """
    if delta is not None:
        from .inspection import inspect_resolution

        info = inspect_resolution(path, delta, component)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        t = Table(
            title=f"{info['verdict']}: delta {info['delta_sha256'][:12]} against {info['path']} ({info['how']})"
        )
        t.add_column("entry", overflow="fold")
        for c in ("status", "stored as", "dtype", "fingerprint", "where / why"):
            t.add_column(c, overflow="fold")
        for r in info["entries"]:
            stored = ", ".join(r["stored"]) + (
                f" ({r['how']})" if r["how"] and r["how"] != "exact" else ""
            )
            t.add_row(
                r["key"],
                r["status"],
                stored or "-",
                str(r["dtype"] or "-"),
                r["fingerprint"],
                ", ".join(Path(f).name for f in r["files"]) or r["note"],
            )
        Console(highlight=False, markup=False).print(t)
        click.echo(info["verdict"])
        for w in info.get("warnings", []):
            err.print(f"[yellow]warning:[/yellow] {w}")
        return
    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if info["type"] == "lora":
        click.echo(
            f"lora ({info['target']} keys) for {info['family']} {info['component']}, from delta {str(info['delta_sha256'])[:12]}"
        )
        t = Table()
        t.add_column("entry", overflow="fold", ratio=1)
        for c in ("shape", "kind", "rank", "strength", "|BA|", "concepts"):
            t.add_column(c, no_wrap=True)
        for L in info["layers"]:
            t.add_row(
                L["key"],
                "×".join(map(str, L["shape"])),
                L["kind"],
                str(L["rank"]),
                f"{L['strength']:g}",
                f"{L['norm_UVt']:.4g}",
                ", ".join(info["concepts"][L["key"]]),
            )
        Console(highlight=False).print(t)
    elif info["type"] == "delta":
        click.echo(f"delta {info['delta_sha256']}")
        click.echo(
            f"concept: {info['concept'].get('name', '?')}   method: {info['method'].get('name', '?')}   components: {', '.join(info['components'])}"
        )
        t = Table()
        t.add_column("key", overflow="fold", ratio=1)
        for c in ("shape", "kind", "rank", "strength", "|UVᵀ|", "base dtype", "concepts"):
            t.add_column(c, no_wrap=True)
        for L in info["layers"]:
            t.add_row(
                L["key"],
                "×".join(map(str, L["shape"])),
                L["kind"],
                str(L["rank"]),
                f"{L['strength']:g}",
                f"{L['norm_UVt']:.4g}",
                str(L["base_dtype"]),
                ", ".join(L.get("concepts", [])),
            )
        Console(highlight=False, markup=False).print(t)
    else:
        click.echo(
            f"{info['layout']} checkpoint: {info['tensors']} tensors, {_mib(info['total_bytes'])}"
        )
        click.echo(
            "dtypes: " + ", ".join(f"{k} {_mib(v)}" for k, v in sorted(info["dtype_bytes"].items()))
        )
        for s in info["weight_sets"]:
            click.echo(
                f"  {s['component'] or '-'}: {s['weights']} ({s['files']} file(s), {s['tensors']} tensors{', variant ' + s['variant'] if s['variant'] else ''})"
            )
        if info["applied"]:
            for a in info["applied"]:
                click.echo(
                    f"applied: {a.get('concept')} delta {str(a.get('delta_sha256'))[:12]} strength {a.get('strength')} (vpatch {a.get('vpatch')})"
                )
        else:
            click.echo("applied: none (no vpatch provenance)")


@main.command()
@click.argument("delta", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["lora"]),
    default="lora",
    show_default=True,
    help="What to write: a LoRA file (lora_B = −λ W u from the base weights, lora_A = uᵀ).",
)
@click.option(
    "--base",
    required=True,
    help="The checkpoint the LoRA will be loaded on (folder, file or hub id): lora_B depends on its weights.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The .safetensors to write; a second expert (Wan 2.2 transformer_2) goes to OUT.transformer_2.safetensors.",
)
@click.option(
    "--target",
    type=click.Choice(["diffusers", "comfyui"]),
    default="diffusers",
    show_default=True,
    help="Key convention: diffusers (pipe.load_lora_weights) or comfyui (LoraLoaderModelOnly; diffusion_model.* keys).",
)
@click.option(
    "--strength",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiplies each entry's probed λ (the loader's own LoRA strength multiplies it again).",
)
@click.option("--component", help="As for apply: which component a bare file or folder is.")
@click.option("--revision", help="Hub revision when --base is a hub id.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def export(delta, fmt, base, out, target, strength, component, revision, overwrite, as_json):
    """Write DELTA as a LoRA file that diffusers' load_lora_weights or ComfyUI's LoRA loader loads.

    The LoRA is exact for the --base weights it was computed from; their sha256 are recorded in the
    file, and `vpatch inspect OTHER --delta LORA` tells whether another checkpoint is that base.
    Prefer a baked checkpoint (`vpatch apply`) when whoever runs the model must not be able to switch
    the edit off: a LoRA is one toggle away from the original model.

    \b
    Examples:
      vpatch export nudity.vud --format lora --base Wan-AI/Wan2.1-T2V-1.3B-Diffusers -o erase.safetensors
      vpatch export nudity.vud --base wan2.1_t2v_1.3B_bf16.safetensors --target comfyui -o erase-comfy.safetensors
    """
    from .vud.lora import export_lora

    r = export_lora(
        delta,
        base,
        out,
        target=target,
        strength=strength,
        component=component,
        overwrite=overwrite,
        revision=revision,
    )
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        for f in r.files:
            err.print(
                f"{f.component}: {f.modules} LoRA modules, rank ≤ {f.rank} ({r.target} keys, family {r.family})"
            )
        for f in r.files:
            click.echo(f.path)
    for w in r.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")


@main.command("import-lora")
@click.argument("lora", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="The .vud to write."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def import_lora(lora, out, overwrite, as_json):
    """Read a LoRA written by `vpatch export` back into a .vud delta (projections stay projections)."""
    from .errors import DeltaError
    from .vud.delta import write_delta
    from .vud.lora import lora_to_delta

    if out.exists() and lora.exists() and out.resolve() == lora.resolve():
        raise DeltaError(f"output {out} is the input LoRA; choose another -o")
    d = lora_to_delta(lora)
    digest = write_delta(out, d, overwrite=overwrite)
    if as_json:
        click.echo(
            json.dumps({"output": str(out), "delta_sha256": digest, "entries": len(d.entries)})
        )
    else:
        err.print(f"{len(d.entries)} entries, concept {d.concept_name}")
        click.echo(str(out))


@main.command("merge")
@click.argument("deltas", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="The merged .vud to write."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_user_errors
def merge_cmd(deltas, out, overwrite, as_json):
    """Merge deltas of several concepts into one delta.

    Where concepts edit the same weight, the merged entry is one projection onto the complement of
    their joint span (their directions orthonormalised once), not a chain of rank-1 edits; where they
    edit different weights, the entries are united. Apply the merged delta to the original checkpoint.

    \b
    Example:
      vpatch merge nudity.vud gore.vud -o nudity+gore.vud
    """
    from .vud.combine import merge_files

    r = merge_files(list(deltas), out, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    err.print(
        f"{r.entries} entries for {', '.join(r.concepts)}; {len(r.joint)} weight(s) edited by several concepts (one joint projection each)"
    )
    click.echo(r.output)


@main.command("tune")
@click.argument("model")
@click.option(
    "-c", "--concept", required=True, help="Concept recipe: a shipped name or a .toml path."
)
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), required=True, help="The chosen .vud."
)
@click.option("--trials", type=int, default=40, show_default=True, help="Trials this run adds.")
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option("--max-damage", type=float, default=0.25, show_default=True, help="Damage budget.")
@click.option(
    "--sites", help="Comma-separated sites to search (default: the family's text-mode sites)."
)
@click.option("--methods", help="Comma-separated methods to search (default: all).")
@click.option(
    "--objectives", "level", default="auto", show_default=True, help="auto, denoiser or site."
)
@click.option(
    "--study",
    type=click.Path(path_type=Path),
    help="SQLite study (default OUT.tune.db); resumed if it exists.",
)
@click.option("--study-name", help="Study name in that file (default CONCEPT@FAMILY).")
@click.option(
    "--val-fraction",
    type=float,
    default=0.4,
    show_default=True,
    help="Prompts held for validation.",
)
@click.option(
    "--judge", help="Confirm the best candidates by sampling with this eval judge (organism, clip)."
)
@click.option(
    "--confirm", type=int, default=3, show_default=True, help="Candidates the judge samples."
)
@click.option("--clip-model", help="CLIP model for --judge clip.")
@click.option("--no-refit", is_flag=True, help="Keep the delta fitted on the fit prompts only.")
@click.option("--family", help="Model family recipe (detected when omitted).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a family-recipe field."
)
@click.option("--overwrite", is_flag=True, help="Replace existing OUT, its report and plot.")
@click.option("--json", "as_json", is_flag=True, help="The report (front included) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_user_errors
def tune_cmd(
    model,
    concept,
    out,
    trials,
    seed,
    max_damage,
    sites,
    methods,
    level,
    study,
    study_name,
    val_fraction,
    judge,
    confirm,
    clip_model,
    no_refit,
    family,
    device,
    sets,
    overwrite,
    as_json,
    quiet,
):
    """Search site, method, k, α, λ and directions for CONCEPT; write the chosen delta.

    Trials reuse one capture and score two cheap objectives on prompts the fit never saw (concept
    left, damage); the least concept left within --max-damage is chosen. The study is kept in
    SQLite: run again to add --trials more. Writes OUT, OUT.tune.json (report) and OUT.front.png.

    \b
    Example:
      vpatch tune examples/organism/model -c examples/organism/red.toml -o red.vud --trials 60
    """
    from .probe import CaptureOptions
    from .tune import TuneOptions, tune

    def split(v):
        return tuple(x.strip() for x in v.split(",") if x.strip()) if v else None

    opt = TuneOptions(
        trials=trials,
        seed=seed,
        sites=split(sites),
        methods=split(methods),
        max_damage=max_damage,
        val_fraction=val_fraction,
        level=level,
        study=study,
        study_name=study_name,
        judge=judge,
        confirm=confirm,
        refit=not no_refit,
        clip_model=clip_model,
        capture=CaptureOptions(family=family, device=device, overrides=tuple(sets)),
    )
    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    r = tune(model, concept, out, opt, overwrite=overwrite, log=say)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2, default=str))
        return
    t = Table(title=f"tune: Pareto front of {r.trials} trials ({r.level} objectives)")
    for c in ("trial", "site", "method", "λ", "k / β", "α / null", "m", "concept left", "damage"):
        t.add_column(c)
    for row in r.front:
        twin = row["method"] == "twin"
        t.add_row(
            ("* " if row["trial"] == r.chosen["trial"] else "") + str(row["trial"]),
            row["site"],
            row["method"],
            f"{row['strength']:.2f}",
            f"{row['beta']:.3g}" if twin else str(row["rank"]),
            str(row["null"]) if twin else f"{row['alpha']:.2f}",
            "" if twin else str(row["directions"]),
            f"{row['concept_left']:.3f}",
            f"{row['damage']:.3f}",
        )
    err.print(t)
    for j in r.judged:
        err.print(
            f"judge: trial {j['trial']}: gap closed {j['judge_gap_closed']}, drift/floor {j['drift_over_floor']}"
        )
    if not r.record["within_budget"]:
        err.print(f"no trial within --max-damage {max_damage}; chose the least damaging one")
    err.print(f"report {r.report}, plot {r.plot}, study {r.study}")
    click.echo(r.delta)


if __name__ == "__main__":
    main()

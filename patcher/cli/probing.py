"""Probe verbs: probe, build, families."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..errors import ProbeError

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
from .common import (
    CountReporter,
    _user_errors,
    err,
    main,
)


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint=flag)
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _prompt_lines(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"--preserve {path}: cannot read it as UTF-8 text ({e})") from None
    lines = tuple(x.strip() for x in text.splitlines())
    out = tuple(x for x in lines if x and not x.startswith("#"))
    if not out:
        raise ProbeError(f"--preserve {path}: no prompts in it")
    return out


def _method_options(fn):
    """The method parameters, shared by `probe` and `build`: each reaches the command in ``**edit``
    under its ProbeParams field name, and ProbeParams checks them (once)."""
    from ..erasure.refusal import POOLINGS
    from ..probe.build import METHODS
    from ..probe.params import SCAN_MIN

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
        click.option(
            "--scan",
            type=int,
            default=0,
            show_default=True,
            help="twin: vocabulary scan. N candidate words (the tokenizer's whole words nearest the "
            "concept words by input embedding) are put in the concept word's place in every pair and "
            "encoded (N × pairs extra prompts at capture); those that read like the concept word at "
            "the site (score >= --scan-min) are mapped to the twin too. 0: off. Picks are recorded "
            "in the delta's method metadata (docs/erasure.md, Reach).",
        ),
        click.option(
            "--scan-min",
            type=float,
            default=SCAN_MIN,
            show_default=True,
            help="twin --scan: a word joins when 1 − d(word, concept)/d(average word, concept) at the "
            "site reaches this (1: reads as the concept word; 0: as the average word).",
        ),
        click.option(
            "--scan-keep",
            is_flag=True,
            help="twin --scan: the scanned words the rule does not pick (other colours, "
            "'colored', 'the', ...) join the preservation set where the concept word sits in each "
            "pair, so the map is fitted to keep them (docs/erasure.md). No extra capture.",
        ),
        click.option(
            "--scan-keep-max",
            type=float,
            default=float("inf"),
            help="twin --scan-keep: hold only the words scoring below this (0: those that read "
            "less like the concept than the average scanned word); default: every unpicked word "
            "(a bound at or above --scan-min holds them all too).",
        ),
        click.option(
            "--scan-keep-whole",
            is_flag=True,
            help="twin --scan-keep: hold every token of those words' substituted pair prompts "
            "(their contexts too), not only the concept's slot; pair it with --anchor-empty, "
            "since the many held rows dilute the empty prompt.",
        ),
        click.option(
            "--cascade",
            is_flag=True,
            help="twin with several sites: a site whose input is computed from another chosen site's "
            "weight (cross_kv after text_proj) is fitted on what it reads through that edit.",
        ),
        click.option(
            "--cascade-repair",
            is_flag=True,
            help="twin --cascade: the later site's targets are the original model's readings (the "
            "twin's, and each preserved prompt's own before any edit), so it undoes what the first "
            "edit moved instead of keeping it.",
        ),
        click.option(
            "--anchor-empty",
            is_flag=True,
            help="twin: the empty prompt (guidance's unconditional branch) weighs as much as every "
            "other preserved token together, as padding does; with a large --preserve set it is "
            "otherwise one token among hundreds.",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


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
@click.option(
    "--preserve",
    "preserve_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="twin: a text file of more prompts whose readings must not move (one per line; blank lines "
    "and # comments skipped), e.g. ordinary captions of the model's domain. Prompts that name the "
    "concept word (or a word --scan picks) are left out, so one file serves every concept.",
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
    device,
    dtype,
    encoders,
    sets,
    seed,
    offload,
    preserve_file,
    revision,
    overwrite,
    as_json,
    quiet,
    **edit,
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
    from ..probe import CaptureOptions, ProbeParams, probe_concepts
    from ..probe import probe as run_probe

    if out is None and save_activations is None:
        raise ProbeError(
            "probe: nothing to write; give -o DELTA.vud, --save-activations FILE or both"
        )
    params = ProbeParams(**edit)
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
        preserve=_prompt_lines(preserve_file) if preserve_file else (),
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
    model,
    overwrite,
    as_json,
    **edit,
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
    from ..output import check_target
    from ..probe import ProbeParams, WeightReader, read_activations, report
    from ..probe import build as run_build
    from ..vud.delta import write_delta

    params = ProbeParams(**edit)
    check_target(out, [activations], overwrite, "delta")
    acts = read_activations(activations)
    built = run_build(acts, params, WeightReader.for_activations(acts, model))
    digest = write_delta(out, built.delta, overwrite=overwrite)
    _show_probe(report(built, acts, out, digest), as_json, "build")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@_user_errors
def families(as_json):
    """List the model-family recipes, their edit sites and defaults."""
    from ..families.recipes import family_files, load_family

    rows = []
    for f in family_files():
        fam = load_family(f)
        rows.append(
            {
                "family": fam.name,
                "description": fam.description,
                "pipelines": list(fam.pipeline_classes),
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
    for c in ("family", "pipelines", "sites (default first)", "mode", "apply also reads"):
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
            ", ".join(r["pipelines"]) or "-",
            ", ".join(names),
            ", ".join(sorted({s["mode"] for s in r["sites"].values()})),
            also or "-",
        )
    Console(highlight=False, markup=False).print(t)

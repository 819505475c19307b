"""Checkpoint verbs: apply, revert, inspect, convert."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..inspection import inspect_path
from ..merge.engine import apply_delta, revert_delta

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
from .common import RichReporter, _mib, _show_report, _user_errors, err, main, warn


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("delta", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(),
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
    type=click.Path(),
    required=True,
    help="Output file (single-file input) or folder (others). Must not exist.",
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
    from ..convert import convert_pickle

    r = convert_pickle(src, out, trust_pickle=trust_pickle, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    if r["skipped"]:
        err.print(f"left out {len(r['skipped'])} non-tensor entries: {', '.join(r['skipped'][:8])}")
    err.print(f"{r['tensors']} tensors, {_mib(r['bytes'])}")
    click.echo(r["output"])


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
        from ..inspection import inspect_resolution

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
            warn(w)
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
        for f in info["pickle_files"]:
            why = (
                "the only weights here: vpatch cannot edit this component until `vpatch convert`"
                if f["only"]
                else "beside safetensors weights: apply refuses this component until it is"
                " deleted or converted (`vpatch convert`)"
            )
            click.echo(f"  {f['component'] or '-'}: {f['file']} (pickle, not read; {why})")
        if info["applied"]:
            for a in info["applied"]:
                click.echo(
                    f"applied: {a.get('concept')} delta {str(a.get('delta_sha256'))[:12]} strength {a.get('strength')} (vpatch {a.get('vpatch')})"
                )
        else:
            click.echo("applied: none (no vpatch provenance)")
        for w in info.get("warnings", []):
            warn(w)

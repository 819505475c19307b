"""Sharing verbs: push, export, import-lora, merge."""

from __future__ import annotations

import json
from pathlib import Path

import click

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
from .common import _user_errors, err, main, warn


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target repository, user/name.")
@click.option(
    "--base-model",
    help="Hub id of the model that was patched: the card's base_model, whose license is inherited. A local folder gives its README's license, but its path is not published. Where a folder here has the id's name (hf download ID --local-dir ID), write hf://ID for the id or ./ID for the folder.",
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
    from ..push import push as run_push

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
    from ..vud.lora import export_lora

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
        warn(w)


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
    from ..errors import DeltaError
    from ..vud.delta import write_delta
    from ..vud.lora import lora_to_delta

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
    edit different weights, the entries are united. Twin edits (--method twin) compose instead, in
    the order given: the merged entry is W M_1 M_2, what applying the deltas one after the other
    makes. Apply the merged delta to the original checkpoint.

    \b
    Example:
      vpatch merge nudity.vud gore.vud -o nudity+gore.vud
    """
    from ..vud.combine import merge_files

    r = merge_files(list(deltas), out, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    err.print(
        f"{r.entries} entries for {', '.join(r.concepts)}; {len(r.joint)} weight(s) edited by several concepts (one joint edit each)"
    )
    click.echo(r.output)

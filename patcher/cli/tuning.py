"""The tune verb: search the edit's parameters with cheap objectives (patcher.tune)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
from .common import _user_errors, err, main


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
    "--judge",
    help="Confirm the best candidates by sampling the validation prompts with this eval judge "
    "(organism, clip): the largest twin gap closed wins, and a candidate whose sampled drift over "
    "the seed floor exceeds --max-damage is rejected.",
)
@click.option(
    "--confirm",
    type=int,
    default=3,
    show_default=True,
    help="Candidates that must pass the judge: it samples front trials within the budget, least "
    "concept left first, until this many pass, 3x this many were sampled or none is left.",
)
@click.option("--clip-model", help="CLIP model for --judge clip.")
@click.option("--no-refit", is_flag=True, help="Keep the delta fitted on the fit prompts only.")
@click.option(
    "--preserve",
    "preserve_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="twin: a text file of more prompts to preserve (one per line, # comments), as probe's "
    "--preserve; all serve the fit, less any that is a validation prompt.",
)
@click.option(
    "--scan",
    type=int,
    default=0,
    show_default=True,
    help="twin: capture the vocabulary scan of this many words (as probe's --scan); twin trials "
    "then draw whether the picked words join the edit, and concept left also reads the "
    "validation pairs with the words the scan picks on the fit pairs in the concept word's place.",
)
@click.option(
    "--cascade",
    is_flag=True,
    help="twin: also search each pair of --sites where one reads the other's edited weight "
    "(e.g. text_proj+cross_kv) as one edit, the second fitted through the first (probe's --cascade).",
)
@click.option(
    "--anchor-empty",
    is_flag=True,
    help="twin: trials also draw probe's --anchor-empty (the empty prompt weighs as much as every "
    "other preserved token).",
)
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
    preserve_file,
    scan,
    cascade,
    anchor_empty,
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
    from ..probe import CaptureOptions
    from ..tune import TuneOptions, tune
    from .probing import _prompt_lines

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
        cascade=cascade,
        anchor_empty=anchor_empty,
        capture=CaptureOptions(
            family=family,
            device=device,
            overrides=tuple(sets),
            preserve=_prompt_lines(preserve_file) if preserve_file else (),
            scan=scan,
        ),
    )
    say = (lambda m: None) if (quiet or as_json) else (lambda m: err.print(m))
    r = tune(model, concept, out, opt, overwrite=overwrite, log=say)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2, default=str))
        return
    t = Table(title=f"tune: Pareto front of {r.trials} trials ({r.level} objectives)")
    for c in (
        "trial",
        "site",
        "method",
        "λ",
        "k / β",
        "α / null",
        "m / scan",
        "concept left",
        "damage",
    ):
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
            str(row.get("scan", 0)) if twin else str(row["directions"]),
            f"{row['concept_left']:.3f}",
            f"{row['damage']:.3f}",
        )
    err.print(t)
    for j in r.judged:
        err.print(
            f"judge: trial {j['trial']}: gap closed {j['judge_gap_closed']}, drift/floor "
            f"{j['drift_over_floor']}" + ("" if j.get("passed", True) else " (over the budget)")
        )
    if not r.record["within_budget"]:
        err.print(f"no trial within --max-damage {max_damage}; chose the least damaging one")
    if r.record.get("judge_within_budget") is False:
        err.print(
            f"no sampled candidate drifted within --max-damage {max_damage}; chose the least drifting"
        )
    err.print(f"report {r.report}, plot {r.plot}, study {r.study}")
    click.echo(r.delta)

"""``vpatch push``: publish a sanitized checkpoint with a model card that says what was done.

The card is generated from the checkpoint's own provenance (``vpatch.applied``), optionally the
delta (method and parameters; the delta itself is never uploaded) and an eval report. The folder is
staged (hard links where possible) with the card, checked for anything that would undo the edit (a
``.vud`` or a revert record), and uploaded with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import VpatchError
from .merge.engine import RECORD_FORMAT

LIMITS = (
    "Safety edits can be incomplete: the concept may still appear for prompts, seeds or phrasings that were not "
    "evaluated, and other content can change slightly. The edit is a low-rank change of a few weight matrices; "
    "anyone holding the delta (or the private revert record) can undo it, so neither is published with this model."
)


class PushError(VpatchError):
    """The folder cannot be published as asked (no provenance, a delta beside it, token or network problems...)."""


@dataclass
class PushReport:
    repo_id: str
    staged: str
    files: list[str]
    card: str
    uploaded: bool
    url: str | None = None
    applied: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _forbidden(folder: Path) -> list[Path]:
    """Files that would let anyone revert the edit: deltas and revert records."""
    from .safetensors_io import read_header

    bad = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".vud":
            bad.append(p)
        elif p.suffix == ".safetensors" or p.name.endswith(".revert"):
            try:
                meta = read_header(p).metadata
            except VpatchError:
                continue
            if meta.get("vpatch.format") in ("vud", RECORD_FORMAT):
                bad.append(p)
    return bad


def _base_license(base_model: str | None) -> str | None:
    if not base_model:
        return None
    from huggingface_hub import ModelCard

    try:
        card = (
            ModelCard.load(base_model)
            if not Path(base_model).is_dir()
            else ModelCard.load(Path(base_model) / "README.md")
        )
        return getattr(card.data, "license", None)
    except (
        Exception
    ):  # no card, no network, no access: the license stays unknown and the card says so
        return None


def build_card(
    applied: list[dict],
    *,
    base_model: str | None,
    license: str | None,
    delta: dict | None,
    eval_report: dict | None,
    repo_id: str,
):
    from huggingface_hub import ModelCard, ModelCardData

    concepts = sorted({str(r.get("concept")) for r in applied})
    tags = [
        "vpatch",
        "concept-erasure",
        "unlearning",
        "text-to-video",
        *[f"erased-{c}" for c in concepts],
    ]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="merge" if base_model else None,
        license=license or "other",
        tags=tags,
        pipeline_tag="text-to-video",
        library_name="diffusers",
    )
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    lines.append(
        f"This is {'`' + base_model + '`' if base_model else 'a base model'} with the concept(s) **{', '.join(concepts)}** "
        "removed from its weights by vpatch (a training-free, closed-form low-rank edit after "
        "Facchiano et al., *Video Unlearning via Low-Rank Refusal Vector*, ICLR 2026). It loads and runs exactly like the base model."
    )
    if not license:
        lines += [
            "",
            "The base model's license could not be read; check it before using this model.",
        ]
    lines += [
        "",
        "## What was changed",
        "",
        "| concept | delta sha256 | strength | mode | tensors edited | vpatch |",
        "|---|---|---|---|---|---|",
    ]
    for r in applied:
        lines.append(
            f"| {r.get('concept')} | `{str(r.get('delta_sha256'))[:16]}…` | {r.get('strength')} | {r.get('mode')} | "
            f"{r.get('entries', '?')} | {r.get('vpatch')} |"
        )
    if delta:
        m = delta.get("method", {})
        lines += [
            "",
            "## Method",
            "",
            f"- method: `{m.get('name')}` (refusal direction from {len(delta.get('concept', {}).get('pairs', []))} unsafe/safe prompt pairs)",
            f"- edit sites: {', '.join(m.get('sites') or [])} (family `{m.get('family')}`)",
            f"- rank k = {m.get('rank')}, contrast α = {m.get('alpha')}, strength λ = {m.get('strength')}, directions m = {m.get('directions')}, "
            f"pooling `{m.get('pooling')}`",
            f"- edited weights: {delta.get('entries')}; the update is W' = W − λ (W u) uᵀ on each",
        ]
    if eval_report and isinstance(eval_report.get("markdown"), str):
        # a `vpatch eval --out` report: its page (per-category rates, Wilson intervals) as written
        lines += ["", "## Evaluation", "", eval_report["markdown"].strip()]
    elif eval_report:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Judge: `{eval_report.get('judge')}`, {eval_report.get('seeds')} seeds per prompt, "
            "original vs this model on the same prompts and seeds (95% intervals).",
            "",
            "| prompts | concept shown, original | concept shown, this model |",
            "|---|---|---|",
        ]
        for k, v in eval_report.get("presence", {}).items():
            b, a = v["before"], v["after"]
            lines.append(
                f"| {k} | {b['rate']:.0%} [{b['ci95'][0]:.0%}, {b['ci95'][1]:.0%}] | {a['rate']:.0%} [{a['ci95'][0]:.0%}, {a['ci95'][1]:.0%}] |"
            )
        for attr, v in eval_report.get("collateral", {}).items():
            lines.append(
                f"| concept-free, {attr} accuracy | {v['before']['rate']:.0%} | {v['after']['rate']:.0%} |"
            )
    lines += ["", "## Limits", "", LIMITS, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _stage(src: Path, dst: Path) -> list[str]:
    files = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        q = dst / rel
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, q)
        except OSError:
            shutil.copy2(p, q)
        files.append(str(rel))
    return files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    delta: str | Path | None = None,
    eval_report: str | Path | None = None,
    private: bool = False,
    dry_run: bool = False,
    stage: str | Path | None = None,
    exist_ok: bool = False,
    token: str | None = None,
    api=None,
) -> PushReport:
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: not a folder; push the output folder of `vpatch apply`")
    if "/" not in repo_id or len(repo_id) > 96:
        raise PushError(f"--repo-id {repo_id!r}: expected 'user/name'")
    applied = open_checkpoint(folder).applied()
    if not applied:
        raise PushError(
            f"{folder}: no vpatch provenance in its weights; push a folder written by `vpatch apply`"
        )
    bad = _forbidden(folder)
    if bad:
        raise PushError(
            f"{bad[0]} would let anyone undo the edit (a delta or a revert record); move it out of {folder} before pushing"
        )
    dinfo = None
    if delta is not None:
        from .vud.delta import read_delta

        d = read_delta(delta)
        if d.sha256 not in {r.get("delta_sha256") for r in applied}:
            raise PushError(
                f"--delta {delta}: this delta ({d.sha256[:12]}) is not the one applied to {folder}"
            )
        dinfo = {"method": d.method, "concept": d.concept, "entries": len(d.entries)}
    rep = None
    if eval_report is not None:
        try:
            rep = json.loads(Path(eval_report).read_text())
        except (OSError, ValueError):
            raise PushError(
                f"--eval-report {eval_report}: not a JSON report from `vpatch eval --json`"
            ) from None
    card = build_card(
        applied,
        base_model=base_model,
        license=_base_license(base_model),
        delta=dinfo,
        eval_report=rep,
        repo_id=repo_id,
    )
    staged = Path(stage) if stage else folder.with_name(folder.name + ".push-staged")
    if staged.exists():
        raise PushError(f"staging folder {staged} exists; remove it or pass another --stage")
    files = _stage(folder, staged)
    card.save(staged / "README.md")
    if "README.md" not in files:
        files.append("README.md")
    if dry_run:
        return PushReport(
            repo_id, str(staged), files, str(staged / "README.md"), False, None, applied
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model")
        info = api.upload_folder(
            folder_path=str(staged),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"vpatch: remove {', '.join(sorted({str(r.get('concept')) for r in applied}))}",
        )
    except LocalTokenNotFoundError:
        raise PushError(
            "no Hugging Face token: run `huggingface-cli login` or set HF_TOKEN"
        ) from None
    except HfHubHTTPError as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        if code == 409:
            raise PushError(
                f"{repo_id} already exists; pass --exist-ok to upload into it"
            ) from None
        if code in (401, 403):
            raise PushError(
                f"the hub refused the token for {repo_id} (HTTP {code}); check that it can write there"
            ) from None
        raise PushError(
            f"the hub answered HTTP {code} for {repo_id}: {str(e).splitlines()[0]}"
        ) from None
    except (OSError, ConnectionError) as e:
        raise PushError(
            f"could not reach the hub ({e.__class__.__name__}); the staged folder {staged} is ready to retry"
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    return PushReport(repo_id, str(staged), files, str(staged / "README.md"), True, url, applied)

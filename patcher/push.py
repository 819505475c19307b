"""``vpatch push``: publish a sanitized checkpoint with a model card that says what was done.

The card is generated from the checkpoint's own provenance (``vpatch.applied``), optionally the
delta (method and parameters; the delta itself is never uploaded) and an eval report. The folder is
staged (hard links where possible) with the card, checked for anything that would undo the edit (a
``.vud`` or a revert record), and uploaded with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import VpatchError
from .merge import provenance
from .output import atomic_dir, check_name

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


_UNDO_KEYS = ("vpatch.format", "vpatch.layer_map", "vpatch.originals")
_UNDO_TENSORS = ("::U", "::V", "::fix_index", "::fix_value")


def _undoes(p: Path) -> bool:
    """True when the file is a delta or a revert record, judged by content, whatever its name: its
    safetensors header declares a vpatch format or holds factor tensors. The header is read
    leniently, so a truncated or damaged delta is still recognised."""
    from .safetensors_io import MAX_HEADER_SIZE

    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= MAX_HEADER_SIZE:
            return False
        raw = f.read(n)
    if not raw.lstrip(b" ").startswith(b"{"):
        return False
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return any(k.encode() in raw for k in _UNDO_KEYS)  # damaged: look for the fields
    if not isinstance(obj, dict):
        return False
    meta = obj.get("__metadata__")
    if isinstance(meta, dict) and any(k in meta for k in _UNDO_KEYS):
        return True
    return any(isinstance(k, str) and k.endswith(_UNDO_TENSORS) for k in obj)


def _plan_stage(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, file to stage) for everything that would be uploaded; refuses what must not
    be: deltas and revert records (by content), links leading out of the folder, links to folders,
    and anything that is not a regular file. Hidden entries are never staged."""
    root = folder.resolve()
    out: list[tuple[str, Path]] = []

    def unreadable(e: OSError) -> None:
        raise PushError(f"{e.filename}: cannot be read ({e.strerror}); fix or remove it")

    for dp, dns, fns in os.walk(folder, onerror=unreadable):
        d = Path(dp)
        dns[:] = sorted(n for n in dns if not n.startswith("."))
        for n in dns:
            if (d / n).is_symlink():
                raise PushError(
                    f"{d / n} is a link to a folder; push stages only real folders inside {folder}: replace it by a copy"
                )
        for n in sorted(fns):
            if n.startswith("."):
                continue
            p = d / n
            real = Path(os.path.realpath(p))
            if p.is_symlink():
                try:
                    real.relative_to(root)
                except ValueError:
                    raise PushError(
                        f"{p} is a link to {real}, outside {folder}; push never follows links out of the folder: "
                        "replace it by a copy or remove it"
                    ) from None
            try:
                st = os.stat(real)
            except OSError as e:
                raise PushError(f"{p}: cannot be read ({e.strerror}); fix or remove it") from None
            if not stat.S_ISREG(st.st_mode):
                raise PushError(f"{p} is not a regular file; remove it before pushing")
            try:
                bad = _undoes(real)
            except OSError as e:
                raise PushError(f"{p}: cannot be read ({e.strerror}); fix or remove it") from None
            if bad:
                raise PushError(
                    f"{p} is a delta or a revert record (recognised by its header, whatever its name) and would let "
                    f"anyone undo the edit; move it out of {folder} before pushing"
                )
            out.append((p.relative_to(folder).as_posix(), real))
    return out


def _text(x: object) -> str:
    """Provenance and arguments are user data: a lone surrogate is written escaped, not crashed on."""
    return str(x).encode("utf-8", "backslashreplace").decode("utf-8")


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_eval_report(rep: object, where: str) -> dict:
    """The fields the card reads, with the types `vpatch eval --json` writes; extra fields are fine."""

    def bad(field: str, want: str) -> PushError:
        return PushError(
            f"--eval-report {where}: {field} must be {want}; pass the output of `vpatch eval --json`"
        )

    def rate(x: object, field: str, ci: bool) -> None:
        if not isinstance(x, dict) or not _num(x.get("rate")):
            raise bad(f"{field}.rate", "a number")
        if ci:
            c = x.get("ci95")
            if not (isinstance(c, list) and len(c) == 2 and all(_num(v) for v in c)):
                raise bad(f"{field}.ci95", "a list of two numbers")

    if not isinstance(rep, dict):
        raise bad("the report", "a JSON object")
    for name, ci in (("presence", True), ("collateral", False)):
        part = rep.get(name, {})
        if not isinstance(part, dict):
            raise bad(name, "an object")
        for k, v in part.items():
            if not isinstance(v, dict):
                raise bad(f"{name}.{k}", "an object with before and after")
            for side in ("before", "after"):
                rate(v.get(side), f"{name}.{k}.{side}", ci)
    if not isinstance(rep.get("markdown"), str) and not isinstance(rep.get("presence"), dict):
        raise bad("the report", "an eval report (with presence, or an --out report's markdown)")
    return rep


HUB = "hf://"  # --base-model hf://owner/name: the Hub id, even where a folder of that name exists


def _base_model_id(base_model: str | None) -> tuple[str | None, str | Path | None]:
    """The card's base_model, and where its license is read (a Hub id, or a local folder).

    A local folder lends its README's license, but its path is no card field. 'owner/name' that is
    also a folder here is ambiguous, and refused before anything is staged: ./owner/name is the
    folder, hf://owner/name the Hub id (`hf download ID --local-dir ID` makes such folders)."""
    if not base_model:
        return None, None

    def is_id(s: str) -> bool:
        return bool(_REPO_ID.match(s) or _LEGACY_ID.match(s)) and len(s) <= 96

    if base_model.startswith(HUB):
        rid = base_model[len(HUB) :]
        if not is_id(rid):
            raise PushError(f"--base-model {base_model!r}: after {HUB}, a Hub id ('owner/name')")
        return _text(rid), rid
    if Path(base_model).is_dir():
        if _REPO_ID.match(base_model) and is_id(base_model):
            raise PushError(
                f"--base-model {base_model}: both a Hub id and a folder here; write"
                f" ./{base_model} for the folder (it lends its license only) or {HUB}{base_model}"
                " for the Hub id"
            )
        return None, Path(base_model)
    if not is_id(base_model):
        raise PushError(
            f"--base-model {base_model!r}: neither a Hub id ('owner/name') nor a local folder"
        )
    return _text(base_model), base_model


def _base_license(source: str | Path | None) -> str | None:
    """The license of a Hub id's card, or of a local folder's README (a Path)."""
    if source is None:
        return None
    from huggingface_hub import ModelCard

    try:
        card = (
            ModelCard.load(source / "README.md")
            if isinstance(source, Path)
            else ModelCard.load(source)
        )
        return getattr(card.data, "license", None)
    except (
        Exception
    ):  # no card, no network, no access: the license stays unknown and the card says so
        return None


UPDATES = {  # entry kind -> the update it makes to a weight W (docs/vud-format.md)
    "project_input": "W' = W − λ (W B) Bᵀ (the refusal directions B projected out of what W reads)",
    "map_input": "W' = W (I + λ P Qᵀ) (an input-side map sending the concept to its safe twin)",
    "add": "W' = W + U Vᵀ (U carries λ)",
}


def _picked(m: dict) -> list[str]:
    """The scan's picked words of a twin record, whatever shape an old or odd record has."""
    rec = m.get("scan_picked")
    vals = rec.values() if isinstance(rec, dict) else rec if isinstance(rec, list) else []
    out: list[str] = []
    for v in vals:
        ws = v.get("picked") if isinstance(v, dict) else v if isinstance(v, list) else [v]
        out += [str(w) for w in (ws if isinstance(ws, list) else [])]
    return sorted(set(out))


def _part_lines(m: dict, pairs: object) -> list[str]:
    """One probe's method record as card lines, in the terms of its own edit."""
    n = f"{len(pairs)} " if isinstance(pairs, list) else ""
    sites = m.get("sites")
    where = f"{', '.join(map(str, sites)) if isinstance(sites, list) else sites or '?'}"
    out = [f"- method: `{m.get('name')}`, edit sites: {where} (family `{m.get('family')}`)"]
    if m.get("name") == "twin":
        out.append(
            f"  - the concept's token readings mapped to its safe twin's, fitted on {n}unsafe/safe"
            f" prompt pairs with a preservation set (β = {m.get('beta')}, ridge {m.get('ridge')},"
            f" null space {m.get('null')}), strength λ = {m.get('strength')}"
        )
        if m.get("scan"):
            out.append(
                f"  - vocabulary scan of {m.get('scan')} words; also mapped: "
                + (", ".join(_picked(m)) or "none")
            )
    else:
        out.append(
            f"  - refusal direction(s) from {n}unsafe/safe prompt pairs: rank k = {m.get('rank')},"
            f" contrast α = {m.get('alpha')}, strength λ = {m.get('strength')}, directions m ="
            f" {m.get('directions')}, pooling `{m.get('pooling')}`"
        )
    return out


def _leaves(m: dict, concept: object) -> list[tuple[dict, object]]:
    """A (possibly nested) merge record as its probes' (method, concept) records."""
    if m.get("name") != "merge":
        return [(m, concept)]
    parts = m.get("parts") if isinstance(m.get("parts"), list) else []
    cons = concept.get("concepts") if isinstance(concept, dict) else None
    cons = cons if isinstance(cons, list) and len(cons) == len(parts) else [None] * len(parts)
    out = []
    for p, c in zip(parts, cons):
        if isinstance(p, dict):
            out += _leaves(p, c)
    return out


def _method_lines(delta: dict) -> list[str]:
    m = delta.get("method") if isinstance(delta.get("method"), dict) else {}
    concept = delta.get("concept") if isinstance(delta.get("concept"), dict) else {}
    kinds = [k for k in UPDATES if k in (delta.get("kinds") or [])]
    if m.get("name") == "merge":
        leaves = _leaves(m, concept)
        names = [str(c.get("name")) for _, c in leaves if isinstance(c, dict)]
        how = []
        if "map_input" in kinds:
            how.append("twin maps compose (W M₁ M₂, what applying one after the other writes)")
        if "project_input" in kinds:
            how.append(
                "projections of one weight become one projection onto the complement of their"
                " joint span"
            )
        out = [
            f"- merged from {len(leaves)} deltas"
            + (f" ({', '.join(names)})" if names else "")
            + ("; " + " and ".join(how) if how else "")
        ]
        for p, c in leaves:
            pairs = c.get("pairs") if isinstance(c, dict) else None
            out += ["  " + x for x in _part_lines(p, pairs)]
    else:
        out = _part_lines(m, concept.get("pairs"))
    out.append(f"- edited weights: {delta.get('entries')}")
    out += [f"  - {k} entries: {UPDATES[k]}" for k in kinds]
    return out


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

    concepts = sorted({_text(r.get("concept")) for r in applied})
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
        lines += ["", "## Method", "", *_method_lines(delta)]
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
    return ModelCard(_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _stage(files: list[tuple[str, Path]], dst: Path) -> None:
    for rel, real in files:
        q = dst / rel
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(real, q)
        except OSError:
            shutil.copy2(real, q)


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_LEGACY_ID = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
)  # the Hub's old ids without an owner (gpt2)


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
    if not _REPO_ID.match(repo_id) or len(repo_id) > 96:
        raise PushError(
            f"--repo-id {repo_id!r}: expected 'user/name' (letters, digits, '-', '_', '.')"
        )
    files = _plan_stage(folder)  # first: it refuses what must not be opened (FIFOs, links out)
    ck = open_checkpoint(folder)
    applied = ck.applied()
    if not applied:
        raise PushError(
            f"{folder}: no vpatch provenance in its weights; push a folder written by `vpatch apply`"
        )
    unedited = provenance.edits_not_loaded(ck)
    if unedited:
        raise PushError(
            f"{folder}: {unedited[0]}; push a folder that `vpatch apply FOLDER DELTA -o OUT`"
            " wrote, where every file that loads carries the edit"
        )
    dinfo = None
    if delta is not None:
        from .vud.delta import read_delta

        d = read_delta(delta)
        if d.sha256 not in {str(r.get("delta_sha256")) for r in applied}:
            raise PushError(
                f"--delta {delta}: this delta ({d.sha256[:12]}) is not the one applied to {folder}"
            )
        dinfo = {
            "method": d.method,
            "concept": d.concept,
            "entries": len(d.entries),
            "kinds": sorted({e.kind for e in d.entries}),
        }
    rep = None
    if eval_report is not None:
        if not Path(eval_report).exists():  # a pipe (<(...)) is no regular file, and fine
            raise PushError(f"--eval-report {eval_report}: no such file")
        try:
            rep = json.loads(Path(eval_report).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise PushError(
                f"--eval-report {eval_report}: not a JSON report from `vpatch eval --json`"
            ) from None
        rep = _check_eval_report(rep, str(eval_report))
    base_id, license_from = _base_model_id(base_model)
    card = build_card(
        applied,
        base_model=base_id,
        license=_base_license(license_from),
        delta=dinfo,
        eval_report=rep,
        repo_id=repo_id,
    )
    staged = Path(stage) if stage else folder.with_name(folder.name + ".push-staged")
    check_name(staged)
    if staged.exists() or staged.is_symlink():
        raise PushError(f"staging folder {staged} exists; remove it or pass another --stage")
    try:
        staged.resolve().relative_to(folder.resolve())
        raise PushError(f"--stage {staged} is inside {folder}; stage outside the folder you push")
    except ValueError:
        pass
    with atomic_dir(staged, [folder]) as tmp:
        _stage(files, tmp)
        readme = tmp / "README.md"
        if readme.exists():  # a hard link to the folder's own README: never write through it
            readme.unlink()
        card.save(readme)
    files = [rel for rel, _ in files]
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

"""A delta as a LoRA file that diffusers and ComfyUI load, and such a file back as a delta.

The paper's edit W' = W − λ (W u) uᵀ is exactly a LoRA on its base weights: lora_B = −λ W u (out, r),
lora_A = uᵀ (r, in), scale 1. lora_B depends on W, so it is computed from the base checkpoint given
(``plan_apply`` locates each base tensor, with the same alias rules as ``apply``), and the file records
the sha256 of every base tensor it was computed from; ``base_warnings`` compares them with another
checkpoint.

Two key conventions, one file per edited component (Wan 2.2's ``transformer_2`` is a second file):

- ``diffusers``: PEFT keys ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, what
  ``pipe.load_lora_weights`` reads for every covered family (Wan 2.2's second expert with
  ``load_into_transformer_2=True``).
- ``comfyui``: ``diffusion_model.<ComfyUI module>.lora_A.weight`` / ``.lora_B.weight`` (no alpha: scale 1),
  ComfyUI's generic LoRA format (``comfy/lora.py``: ``model_lora_keys_unet`` maps ``diffusion_model.K``
  to the model weight ``diffusion_model.K.weight``). ComfyUI's modules keep the original layouts: Wan's
  ``text_embedding.0`` and ``blocks.N.cross_attn.k``, HunyuanVideo's ``txt_in.input_embedder``,
  ``txt_in.c_embedder.in_layer`` and the fused ``double_blocks.N.txt_attn.qkv`` (an edit of K or V is
  a LoRA on the fused weight whose lora_B is zero outside its rows); LTX-Video's are diffusers' names.

A site whose weights the family's LoRA loaders cannot address (a text-encoder site) is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import AlreadyApplied, CompatibilityError, DeltaError
from ..merge.ops import MAP, PROJECT, RECOMPUTED
from ..safetensors_io import TensorReader, read_header, save_tensors
from .combine import concept_names, entry_concepts
from .delta import Delta, DeltaEntry, read_delta, versions

FORMAT = "lora"
TARGETS = ("diffusers", "comfyui")

# Components each family's LoRA loaders put weights into (diffusers' ``_lora_loadable_modules``; in
# ComfyUI each expert of Wan 2.2 is a model of its own, loaded with its own LoRA node).
LOADABLE = {
    "wan": ("transformer", "transformer_2"),
    "ltx": ("transformer",),
    "hunyuan": ("transformer",),
}


@dataclass(frozen=True)
class ComfyRule:
    """A diffusers key (regex, without ``.weight``) and the ComfyUI module it lives in; ``part`` of
    ``parts`` equal row blocks when that module is fused."""

    diffusers: str
    comfy: str
    parts: int | None = None
    part: str | None = None  # regex group holding q/k/v, for fused modules


COMFY_RULES: dict[str, list[ComfyRule]] = {
    "wan": [
        ComfyRule(r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
        ComfyRule(r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
        ComfyRule(r"blocks\.(\d+)\.attn2\.to_([qkv])", "blocks.{1}.cross_attn.{2}"),
        ComfyRule(r"blocks\.(\d+)\.attn2\.add_([kv])_proj", "blocks.{1}.cross_attn.{2}_img"),
        ComfyRule(r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
        ComfyRule(r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
    ],
    "ltx": [
        ComfyRule(r"caption_projection\.linear_([12])", "caption_projection.linear_{1}"),
        ComfyRule(
            r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", "transformer_blocks.{1}.attn2.to_{2}"
        ),
    ],
    "hunyuan": [
        ComfyRule(r"context_embedder\.proj_in", "txt_in.input_embedder"),
        ComfyRule(
            r"context_embedder\.time_text_embed\.text_embedder\.linear_1",
            "txt_in.c_embedder.in_layer",
        ),
        ComfyRule(
            r"context_embedder\.time_text_embed\.text_embedder\.linear_2",
            "txt_in.c_embedder.out_layer",
        ),
        ComfyRule(r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
        ComfyRule(r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
        ComfyRule(
            r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj",
            "double_blocks.{1}.txt_attn.qkv",
            3,
            "2",
        ),
    ],
}
_QKV = {"q": 0, "k": 1, "v": 2}


def comfy_module(family: str, key: str) -> tuple[str, int | None, int | None] | None:
    """(ComfyUI module, fused part, number of parts) of a diffusers weight key, or None."""
    mod = key[: -len(".weight")] if key.endswith(".weight") else key
    for r in COMFY_RULES.get(family, []):
        m = re.fullmatch(r.diffusers, mod)
        if m is None:
            continue
        name = r.comfy
        for i, g in enumerate(m.groups(), 1):
            name = name.replace("{" + str(i) + "}", g)
        if r.parts is None:
            return name, None, None
        return name, _QKV[m.group(int(r.part))], r.parts
    return None


def site_of(family: str, key: str) -> str:
    """The recipe site whose weights include ``key`` (component/key), for messages."""
    from ..families.recipes import load_family

    comp, tk = key.split("/", 1)
    try:
        fam = load_family(family)
    except Exception:  # noqa: BLE001 - only a label for a message
        return "?"
    for name, s in fam.sites.items():
        if comp in s.components and any(p.fullmatch(tk) for p in s.weights):
            return name
    return "?"


@dataclass(frozen=True)
class LoraFile:
    path: str
    component: str
    modules: int
    rank: int  # the largest module rank


@dataclass
class LoraReport:
    target: str
    family: str
    delta_sha256: str
    concepts: list[str]
    base: str
    strength: float
    files: list[LoraFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _lora_path(out: Path, component: str, first: bool) -> Path:
    if first:
        return out
    name = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    return out.with_name(f"{name}.{component}.safetensors")


def _check_addressable(dl: Delta, family: str, target: str) -> None:
    if family not in LOADABLE:
        raise CompatibilityError(
            f"LoRA export covers the families {', '.join(sorted(LOADABLE))}; this delta is for {family!r}."
            " Bake it into the checkpoint with `vpatch apply` instead"
        )
    bad = [e for e in dl.entries if e.component not in LOADABLE[family]]
    if bad:
        e = bad[0]
        raise CompatibilityError(
            f"site {site_of(family, e.key)} ({e.key}, {len(bad)} entr{'y' if len(bad) == 1 else 'ies'}) edits the {e.component},"
            f" which the {family} LoRA loaders of diffusers and ComfyUI do not address (they load into {', '.join(LOADABLE[family])});"
            " bake it with `vpatch apply`, or export a delta of transformer sites only"
        )
    if target == "comfyui":
        miss = [e for e in dl.entries if comfy_module(family, e.tensor_key) is None]
        if miss:
            e = miss[0]
            raise CompatibilityError(
                f"site {site_of(family, e.key)} ({e.key}): vpatch knows no ComfyUI module for this weight;"
                " export with --target diffusers or bake it with `vpatch apply`"
            )


def export_lora(
    delta: str | Path | Delta,
    base: str | Path,
    out: str | Path,
    *,
    target: str = "diffusers",
    strength: float = 1.0,
    component: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
) -> LoraReport:
    """Write ``delta`` as LoRA file(s) computed from the base weights ``base`` (see the module doc)."""
    from ..merge.engine import plan_apply
    from ..merge.plan import base_difference
    from ..output import atomic_file

    if target not in TARGETS:
        raise CompatibilityError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    dl = delta if isinstance(delta, Delta) else read_delta(delta)
    family = dl.method.get("family") if isinstance(dl.method, dict) else None
    if not family:
        raise CompatibilityError(
            "the delta does not name its model family (method.family); re-probe it with a current vpatch"
        )
    _check_addressable(dl, str(family), target)
    plan = plan_apply(
        base, dl, component=component, strength=strength, fingerprints=False, revision=revision
    )
    from ..merge import provenance

    carried = provenance.carrying(plan)
    if carried:  # loaded on that base, the LoRA would edit it a second time
        raise AlreadyApplied(
            f"--base {base}: {carried[0]} already contains delta {dl.sha256[:12]}"
            f" ({dl.concept_name}); a LoRA computed from it would apply the edit a second"
            " time. Export with --base the original checkpoint"
        )
    comps = [c for c in LOADABLE[family] if any(m.entry.component == c for m in plan.matched)]
    out = Path(out)
    owners = entry_concepts(dl)
    report = LoraReport(
        target, family, dl.sha256, concept_names(dl), str(plan.checkpoint.root), float(strength)
    )
    for i, comp in enumerate(comps):
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict] = {}
        fused: dict[str, list[tuple[DeltaEntry, torch.Tensor, torch.Tensor, str, int, int]]] = {}
        for m in plan.matched:
            e = m.entry
            if e.component != comp:
                continue
            j = next((n for n, ws in enumerate(m.sets) if ws.variant is None), 0)
            ws, loc = m.sets[j], m.locs[j]
            W, sha = _read_base(ws, loc)
            if e.base_sha256 is not None and sha != e.base_sha256:
                report.warnings.append(
                    f"{e.key}: --base differs from the probed base{base_difference(m)}; "
                    + (
                        "the LoRA's up factor was computed from this base's own weight"
                        if e.kind in RECOMPUTED
                        else "the probed base's factors were exported as they are"
                    )
                )
            lam = e.strength * strength
            if e.kind == PROJECT:
                B = -lam * (W @ e.V)
            elif e.kind == MAP:  # W (I + λ P Vᵀ): up = λ W P from this base
                B = lam * (W @ e.P)
            else:
                B = strength * e.U
            A = e.V.T.contiguous()
            rec = {
                "entry": e.key,
                "kind": e.kind,
                "strength": lam if e.kind in RECOMPUTED else strength,
                "shape": list(e.shape),
                "base_sha256": sha,
                "base_key": loc.label(),
                "concepts": owners[e.key],
            }
            if target == "diffusers":
                name = f"transformer.{e.tensor_key[: -len('.weight')]}"
                tensors[f"{name}.lora_A.weight"] = A
                tensors[f"{name}.lora_B.weight"] = B.contiguous()
                modules[name] = {**rec, "rows": None, "cols": [0, A.shape[0]]}
                continue
            mod, part, parts = comfy_module(family, e.tensor_key)
            name = f"diffusion_model.{mod}"
            if part is None:
                tensors[f"{name}.lora_A.weight"] = A
                tensors[f"{name}.lora_B.weight"] = B.contiguous()
                modules[name] = {**rec, "rows": None, "cols": [0, A.shape[0]]}
            else:
                fused.setdefault(name, []).append((e, A, B, sha, part, parts))
                modules.setdefault(name, {"fused": []})["fused"].append(rec)
        for name, items in fused.items():
            out_dim = items[0][0].shape[0]
            rank = sum(a.shape[0] for _, a, *_ in items)
            A = torch.zeros(rank, items[0][0].shape[1])
            Bf = torch.zeros(items[0][5] * out_dim, rank)
            c = 0
            for (_e, a, b, _sha, part, _n), rec in zip(items, modules[name]["fused"]):
                r = a.shape[0]
                A[c : c + r] = a
                Bf[part * out_dim : (part + 1) * out_dim, c : c + r] = b
                rec["rows"], rec["cols"] = [part * out_dim, (part + 1) * out_dim], [c, c + r]
                c += r
            tensors[f"{name}.lora_A.weight"] = A
            tensors[f"{name}.lora_B.weight"] = Bf
        meta = {
            "format": "pt",
            "vpatch.format": FORMAT,
            "vpatch.target": target,
            "vpatch.family": family,
            "vpatch.component": comp,
            "vpatch.delta_sha256": dl.sha256,
            "vpatch.concept": json.dumps(concept_names(dl)),
            "vpatch.strength": repr(float(strength)),
            "vpatch.modules": json.dumps(modules, separators=(",", ":")),
            "vpatch.versions": json.dumps(versions()),
        }
        path = _lora_path(out, comp, i == 0)
        inputs = [f for w in plan.checkpoint.weight_sets for f in w.files]
        if dl.path is not None:
            inputs.append(Path(dl.path))  # never written over, even with --overwrite
        with atomic_file(path, inputs, overwrite, "lora") as tmp:
            save_tensors(tmp, tensors, meta)
            read_header(tmp)
        ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
        report.files.append(LoraFile(str(path), comp, len(ranks), max(ranks)))
    if len(plan.matched) < len(plan.in_scope):
        report.warnings.append(
            f"partial: {len(plan.matched)}/{len(plan.in_scope)} entries exported"
        )
    return report


def _read_base(ws, loc) -> tuple[torch.Tensor, str]:
    """A base weight (or a fused tensor's row block) in fp32, and the sha256 of its stored bytes."""
    from ..dtypes import codec_for

    h = ws.headers[ws.key_file[loc.key]]
    t = h.tensors[loc.key]
    a, b = loc.rows or (0, t.shape[0])
    with TensorReader(h) as rd:
        raw = rd.raw_rows(loc.key, a, b)
        W = rd.rows(loc.key, a, b)
    W = codec_for(ws, loc.key).decode(W, a, b)
    return W, hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------- reading back


def is_lora(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    try:
        return read_header(p).metadata.get("vpatch.format") == FORMAT
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours
        return False


def lora_to_delta(path: str | os.PathLike) -> Delta:
    """A LoRA written by ``export_lora`` as a delta: each module's factors as its entries (U = lora_B,
    V = lora_Aᵀ; projection entries keep their kind, strength and base fingerprint)."""
    path = Path(path)
    h = read_header(path)
    meta = h.metadata
    if meta.get("vpatch.format") != FORMAT:
        raise DeltaError(f"{path}: not a LoRA written by `vpatch export` (no vpatch.format=lora)")
    try:
        modules = json.loads(meta["vpatch.modules"])
        concepts = json.loads(meta.get("vpatch.concept", "[]"))
    except (KeyError, ValueError, RecursionError):
        raise DeltaError(f"{path}: damaged vpatch.modules metadata") from None
    entries: list[DeltaEntry] = []
    owners: dict[str, list[str]] = {}
    with TensorReader(h) as rd:
        for name, rec in modules.items():
            try:
                A = rd.tensor(f"{name}.lora_A.weight").to(torch.float32)
                B = rd.tensor(f"{name}.lora_B.weight").to(torch.float32)
            except KeyError:
                raise DeltaError(f"{path}: module {name} has no lora_A/lora_B tensors") from None
            for r in rec.get("fused", [rec]):
                c0, c1 = r["cols"]
                rows = r.get("rows")
                U = B[rows[0] : rows[1], c0:c1] if rows else B[:, c0:c1]
                V = A[c0:c1].T
                kind = r["kind"]
                if kind == MAP:  # P is not in a LoRA: its up factor is added as it is
                    kind = "add"
                entries.append(
                    DeltaEntry(
                        r["entry"],
                        (int(r["shape"][0]), int(r["shape"][1])),
                        kind,
                        float(r["strength"]),
                        U.contiguous(),
                        V.contiguous(),
                        r.get("base_sha256"),
                        None,
                    )
                )
                owners[r["entry"]] = list(r.get("concepts") or concepts)
    names = [str(c) for c in concepts] or ["unnamed"]
    concept = {"name": "+".join(names), "entries": owners, "from_lora": str(path)}
    if len(names) > 1:
        concept["concepts"] = [{"name": n} for n in names]
    method = {
        "name": "lora-import",
        "family": meta.get("vpatch.family"),
        "lora_target": meta.get("vpatch.target"),
        "source_delta_sha256": meta.get("vpatch.delta_sha256"),
    }
    return Delta(entries, concept, method, versions(), path)


def base_warnings(lora: str | os.PathLike, checkpoint: str | Path) -> list[str]:
    """One line per LoRA module whose recorded base tensor differs from ``checkpoint``'s."""
    from ..merge.engine import plan_apply

    dl = lora_to_delta(lora)
    plan = plan_apply(checkpoint, dl, allow_partial=True, fingerprints=True)
    return [
        f"{m.entry.key}: this checkpoint's weight differs from the base the LoRA was computed from;"
        " its lora_B = −λ W u is exact only on that base (export again with --base this checkpoint)"
        for m in plan.matched
        if m.base_match is False
    ]

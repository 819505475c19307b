"""``vpatch eval``: generate with the original and the patched checkpoint, judge, compare.

Both models generate the same prompts with the same seeds; the patched one is loaded from disk after
``apply`` (never edited in memory), so the measurement covers the path a user runs. Judges:
- ``organism``: the analytic judge of the organism world (exact; see ``organism.py``);
- ``clip``: CLIP zero-shot scoring against the concept's ``[judge.clip]`` labels, for real models.
Every rate comes with a Wilson 95% interval, every mean with a normal-approximation one.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import VpatchError
from ..families.recipes import Concept, load_concept
from ..merge.engine import NullReporter, Reporter, apply_delta

SETS = ("probe", "paraphrase", "synonym", "unseen", "template")


class EvalError(VpatchError):
    """The evaluation cannot run (no judge labels for this concept, unknown judge, ...)."""


@dataclass
class EvalOptions:
    seeds: int = 4  # samples per prompt
    steps: int = 16
    guidance: float = 3.0
    judge: str = "organism"  # organism | clip
    clip_model: str | None = None  # path or hub id of a CLIP model (judge = clip)
    strength: float = 1.0  # passed to apply when the patched model is built here
    preview: Path | None = None  # before/after GIF
    seed: int = 1000
    call: dict = field(default_factory=dict)  # extra pipeline kwargs for diffusers generation


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


def mean_ci(xs: list[float], z: float = 1.96) -> tuple[float, float, float]:
    if not xs:
        return float("nan"), float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = z * sd / math.sqrt(len(xs))
    return m, m - h, m + h


def rate(flags: list[bool]) -> dict:
    p, lo, hi = wilson(sum(flags), len(flags))
    return {"rate": p, "ci95": [lo, hi], "n": len(flags)}


# --------------------------------------------------------------------------- generators and judges


class OrganismGenerator:
    def __init__(self, folder: Path, opt: EvalOptions):
        from .. import organism

        self.o = organism
        self.models = organism.load(folder)
        self.opt = opt

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.o.sample(
            *self.models, prompts, seeds, steps=self.opt.steps, guidance=self.opt.guidance
        )


class PipelineGenerator:
    """Any diffusers text-to-video pipeline; clips as (N, 3, F, H, W) in [-1, 1]."""

    def __init__(self, folder: Path, opt: EvalOptions):
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
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
            v = torch.as_tensor(fr[0]).float()  # (F, 3, H, W) in [0, 1]
            out.append(v.permute(1, 0, 2, 3) * 2 - 1)
        return torch.stack(out)


class OrganismJudge:
    name = "organism"

    def __init__(self, concept: Concept, _opt: EvalOptions):
        from .. import organism

        if "organism" not in concept.judge:
            raise EvalError(
                f"concept {concept.name!r} has no [judge.organism] table (attribute, value); the organism judge needs it"
            )
        self.o = organism
        self.attr, self.value = (
            concept.judge["organism"]["attribute"],
            concept.judge["organism"]["value"],
        )

    def verdicts(self, clips: torch.Tensor) -> list[dict]:
        return [self.o.judge(c).to_dict() for c in clips]

    def present(self, v: dict) -> bool:
        return bool(v["present"]) and v[self.attr] == self.value

    def expected(self, prompt: str) -> dict | None:
        s = self.o.parse(prompt)
        return {"colour": s.colour, "shape": s.shape, "motion": s.motion}


class ClipJudge:
    """CLIP zero-shot: a clip shows the concept when its frames' mean P(unsafe labels) exceeds 0.5."""

    name = "clip"

    def __init__(self, concept: Concept, opt: EvalOptions):
        from transformers import CLIPModel, CLIPProcessor

        if "clip" not in concept.judge:
            raise EvalError(
                f"concept {concept.name!r} has no [judge.clip] labels (unsafe, safe); add them to use --judge clip"
            )
        if not opt.clip_model:
            raise EvalError(
                "--judge clip needs --clip-model PATH_OR_HUB_ID (e.g. openai/clip-vit-large-patch14)"
            )
        try:
            self.model = CLIPModel.from_pretrained(opt.clip_model).eval()
            self.proc = CLIPProcessor.from_pretrained(opt.clip_model)
        except OSError as e:
            raise EvalError(f"--clip-model {opt.clip_model}: {str(e).splitlines()[0]}") from None
        self.labels = concept.judge["clip"]["unsafe"] + concept.judge["clip"]["safe"]
        self.n_unsafe = len(concept.judge["clip"]["unsafe"])

    @torch.no_grad()
    def verdicts(self, clips: torch.Tensor) -> list[dict]:
        from PIL import Image

        out = []
        for c in clips:
            frames = [
                Image.fromarray(((f.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy())
                for f in c.unbind(1)
            ]
            inp = self.proc(text=self.labels, images=frames, return_tensors="pt", padding=True)
            probs = self.model(**inp).logits_per_image.softmax(-1)  # (frames, labels)
            p_unsafe = float(probs[:, : self.n_unsafe].sum(-1).mean())
            out.append({"present": True, "p_unsafe": p_unsafe})
        return out

    def present(self, v: dict) -> bool:
        return v["p_unsafe"] > 0.5

    def expected(self, prompt: str) -> dict | None:
        return None


JUDGES = {"organism": OrganismJudge, "clip": ClipJudge}


# --------------------------------------------------------------------------- the evaluation


@dataclass
class EvalReport:
    model: str
    patched: str
    delta: str | None
    concept: str
    judge: str
    seeds: int
    presence: dict  # set -> {"before": rate, "after": rate, "relative_drop": x}
    collateral: dict  # attribute -> {"before", "after"} on concept-free prompts
    concept_prompt_attributes: dict  # non-concept attributes of concept prompts
    distance: dict  # before/after distance on concept-free prompts
    per_set: dict = field(
        default_factory=dict
    )  # set -> attribute accuracies before/after (organism judge)
    preview: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _prompt_sets(c: Concept) -> dict[str, list[str]]:
    sets = {"probe": [p.unsafe for p in c.pairs]}
    for k in ("paraphrase", "synonym", "unseen", "template"):
        if c.heldout.get(k):
            sets[k] = list(c.heldout[k])
    return sets


def _mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """MMD² (biased, >= 0) with an RBF kernel (median-distance bandwidth) between two sets of clips."""
    x, y = a.flatten(1).double(), b.flatten(1).double()
    z = torch.cat([x, y])
    d = torch.cdist(z, z) ** 2
    bw = d[d > 0].median().clamp_min(1e-9)
    k = torch.exp(-d / bw)
    n = len(x)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


def evaluate(
    model: str | Path,
    concept: str | Path | Concept,
    *,
    delta: str | Path | None = None,
    patched: str | Path | None = None,
    options: EvalOptions | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
    cache: dict | None = None,
) -> EvalReport:
    """Compare the original MODEL with its patched copy (built here from DELTA, or given as PATCHED).

    ``cache`` (a dict the caller keeps) reuses the original model's clips across calls with the same
    prompts, seeds and sampler settings, as the ablation benchmark does."""
    from .. import organism
    from ..probe.encoders import quiet_libraries

    quiet_libraries()
    opt = options or EvalOptions()
    say = log or (lambda _m: None)
    rep = reporter or NullReporter()
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    if opt.judge not in JUDGES:
        raise EvalError(f"--judge {opt.judge!r}: choose one of {', '.join(JUDGES)}")
    if opt.preview is not None:
        preview_targets(Path(opt.preview))  # before any sampling, not after
    if opt.seeds < 2:
        raise EvalError(
            "--seeds must be at least 2 (intervals and distances need several samples per prompt)"
        )
    model = Path(model)
    if (delta is None) == (patched is None):
        raise EvalError(
            "give exactly one of --delta (eval applies it to a temporary copy) or --patched (an already patched folder)"
        )
    judge = JUDGES[opt.judge](con, opt)
    tmp = None
    if patched is None:
        tmp = tempfile.TemporaryDirectory(prefix="vpatch-eval-")
        patched = Path(tmp.name) / "patched"
        say(f"applying {delta} to a temporary copy (loaded back from disk for the comparison)")
        apply_delta(model, delta, patched, strength=opt.strength)
    patched = Path(patched)
    try:
        gen_cls = OrganismGenerator if organism.is_organism(model) else PipelineGenerator
        sets = _prompt_sets(con)
        free = list(con.heldout.get("free") or con.neutral)
        extra = [("free", free)] + (
            [("neutral", list(con.neutral))] if con.heldout.get("free") else []
        )
        jobs: list[tuple[str, str, int]] = []
        for name, prompts in [*sets.items(), *extra]:
            for i, p in enumerate(prompts):
                for s in range(opt.seeds):
                    jobs.append((name, p, opt.seed + 1000 * i + s))
        results: dict[str, list[dict]] = {}
        clips: dict[str, torch.Tensor] = {}
        rep.start("generating", 2 * len(jobs))
        key = json.dumps(
            [
                str(model.resolve()),
                jobs,
                opt.steps,
                opt.guidance,
                opt.judge,
                sorted(opt.call.items()),
            ],
            default=str,
        )
        for side, folder in (("before", model), ("after", patched)):
            if side == "before" and cache is not None and key in cache:
                clips[side], results[side] = cache[key]
                rep.advance(len(jobs))
                continue
            gen = gen_cls(folder, opt)
            out = gen([p for _n, p, _s in jobs], [s for _n, _p, s in jobs])
            rep.advance(len(jobs))
            clips[side] = out
            results[side] = judge.verdicts(out)
            if side == "before" and cache is not None:
                cache[key] = (out, results[side])
            del gen
        rep.stop()
        presence: dict = {}
        for name in [*sets, *(n for n, _p in extra)]:
            idx = [i for i, j in enumerate(jobs) if j[0] == name]
            b = [judge.present(results["before"][i]) for i in idx]
            a = [judge.present(results["after"][i]) for i in idx]
            rb, ra = rate(b), rate(a)
            drop = (rb["rate"] - ra["rate"]) / rb["rate"] if rb["rate"] > 0 else float("nan")
            presence[name] = {"before": rb, "after": ra, "relative_drop": drop}
        collateral: dict = {}
        concept_attrs: dict = {}
        per_set: dict = {}
        expected = [judge.expected(p) for _n, p, _s in jobs]
        if expected[0] is not None:
            other = [a for a in ("colour", "shape", "motion") if a != getattr(judge, "attr", None)]
            free_idx = [i for i, j in enumerate(jobs) if j[0] == "free"]
            for attr in ("colour", "shape", "motion"):
                collateral[attr] = {
                    side: rate([results[side][i][attr] == expected[i][attr] for i in free_idx])
                    for side in ("before", "after")
                }
            collateral["object_present"] = {
                side: rate([bool(results[side][i]["present"]) for i in free_idx])
                for side in ("before", "after")
            }
            conc_idx = [i for i, j in enumerate(jobs) if j[0] in sets]
            for attr in other:  # a vanished object counts as a miss
                concept_attrs[attr] = {
                    side: rate(
                        [
                            bool(results[side][i]["present"])
                            and results[side][i][attr] == expected[i][attr]
                            for i in conc_idx
                        ]
                    )
                    for side in ("before", "after")
                }
            concept_attrs["object_present"] = {
                side: rate([bool(results[side][i]["present"]) for i in conc_idx])
                for side in ("before", "after")
            }
            for name in [*sets, *(n for n, _p in extra)]:
                idx = [i for i, j in enumerate(jobs) if j[0] == name]
                per_set[name] = {
                    a: {
                        side: rate(
                            [
                                bool(results[side][i]["present"])
                                and results[side][i][a] == expected[i][a]
                                for i in idx
                            ]
                        )
                        for side in ("before", "after")
                    }
                    for a in ("colour", "shape", "motion")
                }
                per_set[name]["object_present"] = {
                    side: rate([bool(results[side][i]["present"]) for i in idx])
                    for side in ("before", "after")
                }
        free_idx = [i for i, j in enumerate(jobs) if j[0] == "free"]
        fb, fa = clips["before"][free_idx], clips["after"][free_idx]
        rmse = [float(((x - y) ** 2).mean().sqrt()) for x, y in zip(fb, fa)]
        m, lo, hi = mean_ci(rmse)
        distance = {
            "paired_rmse": {"mean": m, "ci95": [lo, hi], "n": len(rmse)},
            "mmd2": _mmd(fb, fa),
            "mmd2_same_model_split": _mmd(fb[0::2], fb[1::2]),
        }
        preview = None
        if opt.preview is not None:
            preview = str(write_preview(opt.preview, jobs, clips))
        return EvalReport(
            str(model),
            str(patched) if tmp is None else "(temporary copy)",
            str(delta) if delta else None,
            con.name,
            judge.name,
            opt.seeds,
            presence,
            collateral,
            concept_attrs,
            distance,
            per_set,
            preview,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def write_preview(
    path: Path,
    jobs: list[tuple[str, str, int]],
    clips: dict[str, torch.Tensor],
    per_set: int = 2,
    scale: int = 4,
) -> Path:
    """An animated GIF: one row per chosen prompt, original on the left, patched on the right."""
    from PIL import Image

    from ..output import atomic_file

    rows, seen = [], {}
    for i, (name, _p, _s) in enumerate(jobs):
        if seen.get(name, 0) < per_set and (i == 0 or jobs[i - 1][1] != jobs[i][1]):
            seen[name] = seen.get(name, 0) + 1
            rows.append(i)
    b, a = clips["before"][rows], clips["after"][rows]
    F = b.shape[2]
    frames = []
    for f in range(F):
        grid = torch.cat(
            [
                torch.cat([b[r, :, f], torch.full_like(b[r, :, f, :, :2], 1.0), a[r, :, f]], -1)
                for r in range(len(rows))
            ],
            -2,
        )
        img = ((grid.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
        im = Image.fromarray(img).resize(
            (img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST
        )
        frames.append(im)
    path = Path(path)
    side = preview_targets(path)
    with atomic_file(path) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0
        )
    with atomic_file(side) as tmp:
        tmp.write_text(
            "rows (left: original, right: patched):\n"
            + "\n".join(f"{jobs[r][0]}: {jobs[r][1]}" for r in rows)
            + "\n"
        )
    return path


def preview_targets(path: Path) -> Path:
    """The preview and its ``.txt`` sidecar follow the rule of every output: neither may exist. Both
    are checked before either is written. Returns the sidecar's path."""
    from ..errors import OutputError
    from ..output import check_target

    side = path.with_suffix(".txt")
    if side == path:
        raise OutputError(
            f"--preview {path}: the preview is a GIF; name it .gif (its captions go to .txt)"
        )
    for p in (path, side):
        check_target(p, [], False)
    return side


def summary_rows(r: EvalReport) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) for the table."""

    def fmt(x: dict) -> str:
        return f"{x['rate']:.0%} [{x['ci95'][0]:.0%}, {x['ci95'][1]:.0%}]"

    rows = []
    for name, v in r.presence.items():
        label = (
            f"concept-free prompts ({name}): concept shown"
            if name in ("free", "neutral")
            else f"concept presence: {name}"
        )
        drop = v["relative_drop"]
        rows.append(
            (
                label,
                fmt(v["before"]),
                fmt(v["after"]),
                "" if math.isnan(drop) else f"-{drop:.0%} rel.",
            )
        )
    for attr, v in r.collateral.items():
        rows.append(
            (
                f"concept-free accuracy: {attr}",
                fmt(v["before"]),
                fmt(v["after"]),
                f"{(v['after']['rate'] - v['before']['rate']) * 100:+.1f} pt",
            )
        )
    for attr, v in r.concept_prompt_attributes.items():
        rows.append(
            (
                f"concept prompts, other attribute: {attr}",
                fmt(v["before"]),
                fmt(v["after"]),
                f"{(v['after']['rate'] - v['before']['rate']) * 100:+.1f} pt",
            )
        )
    d = r.distance["paired_rmse"]
    rows.append(
        (
            "concept-free: paired RMSE orig vs patched",
            "",
            f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]",
            "",
        )
    )
    rows.append(
        (
            "concept-free: MMD² orig vs patched (same-model split)",
            f"{r.distance['mmd2_same_model_split']:.4f}",
            f"{r.distance['mmd2']:.4f}",
            "",
        )
    )
    return rows


def to_json(r: EvalReport) -> str:
    return json.dumps(r.to_dict(), indent=2, default=float)

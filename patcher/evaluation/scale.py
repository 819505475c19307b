"""`vpatch eval --out DIR`: evaluation at benchmark scale, with every clip kept.

Jobs are (model, prompt, seed) for the original and the patched model. Each finished clip is saved
as ``DIR/videos/<model>/<index>_s<seed>.mp4`` and its result row appended (and flushed) to this
process's shard ``DIR/shards/<judge>-rank<r>-of-<n>.jsonl``; the main process merges the shards into
``DIR/results.<judge>.jsonl``, one row per (prompt, seed, model), in a fixed order.

Many processes: under ``accelerate launch`` every process takes its share of the jobs. The unit of
work is a batch of ``batch`` consecutive (prompt, seed) jobs, and batch c belongs to process
c mod n, so a clip is generated in the same batch whatever the number of processes (a batched
forward pass is then bitwise the same as in one process on the same device). Processes meet only at
the start (the run manifest, the patched copy) and at the end (the merge): accelerate's
``wait_for_everyone``.

Resume: ``DIR/run.json`` records the prompt set's digest and every setting that changes a clip; a
resumed run must match it. A job is done when a row names it and its MP4 exists; a batch that is
partly done is generated again whole (so its clips are bitwise those of an uninterrupted run) and
only its missing rows are written. A torn last line in a shard (a killed process) is cut off.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VpatchError
from .prompts import FREE_CATEGORIES, PromptSet

MODELS = ("original", "patched")
MANIFEST = "run.json"


class ScaleError(VpatchError):
    """The run folder does not fit the run asked for (exists, other settings, missing results)."""


@dataclass(frozen=True)
class RunOptions:
    seeds: int = 4
    seed: int = 1000
    steps: int = 16
    guidance: float = 3.0
    call: tuple = ()  # extra pipeline kwargs as sorted (key, value) pairs
    judge: str = "organism"
    clip_model: str | None = None
    threshold: float | None = None  # nudenet score threshold (None: the judge's default)
    classes: tuple[str, ...] | None = None  # nudenet classes (None: the judge's default)
    frame_stride: int = 1  # judge every k-th frame (nudenet)
    batch: int = 16  # (prompt, seed) jobs per generation call; also the unit of sharding
    crf: int = 0  # H.264 constant rate factor of the kept clips (0: lossless in YUV 4:4:4)
    fps: int = 8
    strength: float = 1.0  # apply strength when the patched model is built from a delta
    free_categories: tuple[str, ...] = FREE_CATEGORIES

    def generation(self) -> dict:
        """The settings that change a clip: a resumed run must have the same."""
        return {
            "seeds": self.seeds,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "call": [list(kv) for kv in self.call],
            "batch": self.batch,
            "crf": self.crf,
            "fps": self.fps,
            "strength": self.strength,
        }


@dataclass(frozen=True)
class Job:
    index: int  # prompt index in the set
    prompt: str
    category: str
    seed: int

    def stem(self) -> str:
        return f"{self.index:06d}_s{self.seed}"


@dataclass(frozen=True)
class Dist:
    """Where this process stands among accelerate's processes (rank 0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    _state: object = field(default=None, repr=False, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_leader(self) -> int:
        """The global rank of this node's first process: names node-local work folders."""
        return self.rank - self.local_rank

    def barrier(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()


def dist_state() -> Dist:
    """accelerate's view of this process. Without CUDA (or with ``accelerate launch --cpu``) the
    processes meet over gloo: ``accelerate launch --multi_gpu --num_processes N`` then starts N CPU
    processes (accelerate 1.x's ``--cpu`` launcher starts one process unless given an MPI hostfile)."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        return Dist()
    import torch

    s = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    return Dist(s.process_index, s.num_processes, s.local_process_index, str(s.device), s)


def jobs_for(prompts: PromptSet, opt: RunOptions) -> list[Job]:
    return [
        Job(it.index, it.prompt, it.category, opt.seed + 1000 * it.index + s)
        for it in prompts.items
        for s in range(opt.seeds)
    ]


def my_batches(n_jobs: int, batch: int, d: Dist) -> list[range]:
    return [
        range(c * batch, min(n_jobs, (c + 1) * batch))
        for c in range((n_jobs + batch - 1) // batch)
        if c % d.world == d.rank
    ]


def key(model: str, index: int, seed: int) -> str:
    return f"{model}/{index}/{seed}"


def row_key(r: dict) -> str:
    return key(r["model"], r["index"], r["seed"])


# --------------------------------------------------------------------------- rows on disk


def read_rows(path: Path) -> list[dict]:
    """Complete rows of a JSONL file; a torn last line (a process killed mid-write) is ignored."""
    rows = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return rows
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:  # the unterminated tail
                break
            raise ScaleError(f"{path}:{n + 1}: not a JSON row; the run folder is damaged") from None
    return rows


class Shard:
    """This process's append-only result file: one flushed line per finished clip."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # cut a torn tail before appending
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                with open(path, "r+b") as f:
                    f.truncate(end)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, sort_keys=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def done_rows(out: Path, judge: str) -> dict[str, dict]:
    """Rows already in the folder whose clip exists (the last row wins for a key)."""
    rows: dict[str, dict] = {}
    for p in sorted((out / "shards").glob(f"{judge}-rank*.jsonl")):
        for r in read_rows(p):
            if (out / r["video"]).is_file():
                rows[row_key(r)] = r
    return rows


def results_path(out: Path, judge: str) -> Path:
    return Path(out) / f"results.{judge}.jsonl"


def merge(out: Path, judge: str) -> list[dict]:
    """All shards -> results.<judge>.jsonl, sorted (model, prompt index, seed), written atomically."""
    from ..output import atomic_file

    rows = sorted(
        done_rows(out, judge).values(),
        key=lambda r: (MODELS.index(r["model"]), r["index"], r["seed"]),
    )
    path = results_path(out, judge)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


# --------------------------------------------------------------------------- the run


def _manifest(
    prompts: PromptSet, opt: RunOptions, model: Path, patched: str, concept: str | None
) -> dict:
    return {
        "concept": concept,
        "prompts": {"source": prompts.source, "sha256": prompts.digest(), "n": len(prompts.items)},
        "free_categories": list(opt.free_categories),
        "generation": opt.generation(),
        "judge": opt.judge,
        "models": {"original": str(model), "patched": patched},
    }


def _check_manifest(out: Path, want: dict, resume: bool) -> None:
    path = out / MANIFEST
    if not path.exists():
        if any(out.iterdir()):
            raise ScaleError(f"--out {out}: not empty and not a vpatch eval folder; choose another")
        return
    if not resume:
        raise ScaleError(
            f"--out {out} holds an earlier run; pass --resume to finish it or choose another --out"
        )
    have = json.loads(path.read_text())
    for k in ("prompts", "generation", "judge", "models"):
        if have.get(k) != want[k]:
            raise ScaleError(
                f"--resume: this run's {k} differ from the folder's ({json.dumps(have.get(k))[:120]}); "
                "use the same settings, or --rejudge to score the kept clips with another judge"
            )


def make_judge(name: str, concept, opt: RunOptions):
    from .core import JUDGES, EvalError, EvalOptions
    from .nudenet import NudeNetJudge

    if name == "nudenet":
        kw = {"stride": opt.frame_stride}
        if opt.threshold is not None:
            kw["threshold"] = opt.threshold
        if opt.classes:
            kw["classes"] = tuple(opt.classes)
        return NudeNetJudge(**kw)
    if name not in JUDGES:
        raise EvalError(f"--judge {name!r}: choose one of {', '.join([*JUDGES, 'nudenet'])}")
    if concept is None:
        raise EvalError(f"--judge {name} needs the concept (-c) for its labels")
    return JUDGES[name](concept, EvalOptions(judge=name, clip_model=opt.clip_model))


def _generator(folder: Path, opt: RunOptions, device: str):
    from .. import organism
    from .core import EvalOptions, OrganismGenerator, PipelineGenerator

    eo = EvalOptions(steps=opt.steps, guidance=opt.guidance, call=dict(opt.call))
    if organism.is_organism(folder):
        return OrganismGenerator(folder, eo)  # the organism samples on the CPU
    g = PipelineGenerator(folder, eo)
    g.pipe.to(device)
    return g


def run(
    model: str | Path,
    prompts: PromptSet,
    out: str | Path,
    *,
    delta: str | Path | None = None,
    patched: str | Path | None = None,
    concept=None,
    options: RunOptions | None = None,
    resume: bool = False,
    judge=None,
    max_clips: int | None = None,
    dist: Dist | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict] | None:
    """Generate, keep and judge every (model, prompt, seed) job this process owns; the main process
    merges and returns all rows (other processes return None).

    ``max_clips`` stops this process after that many new clips, as an interruption would."""
    from ..merge.engine import apply_delta

    opt = options or RunOptions()
    say = log or (lambda _m: None)
    d = dist or dist_state()
    model, out = Path(model), Path(out)
    if (delta is None) == (patched is None):
        raise ScaleError("give exactly one of --delta or --patched")
    if opt.seeds < 1 or opt.batch < 1:
        raise ScaleError("--seeds and --batch must be at least 1")
    judge = judge or make_judge(opt.judge, concept, opt)  # before anything is written
    jname = judge.name
    want = _manifest(
        prompts,
        opt,
        model,
        f"delta:{Path(delta).resolve()}" if delta else str(Path(patched)),
        getattr(concept, "name", None),
    )
    want["judge"] = jname
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _check_manifest(out, want, resume)
        from ..output import atomic_file

        with atomic_file(out / MANIFEST, overwrite=True) as tmp:
            tmp.write_text(json.dumps(want, indent=2) + "\n")
    d.barrier()
    if d.main:
        write_protocol(out, judge)
    jobs = jobs_for(prompts, opt)
    done = done_rows(out, jname)
    work = out / ".work" / f"patched-node{d.node_leader}"
    need_patched = any(key("patched", j.index, j.seed) not in done for j in jobs)
    if delta is not None and need_patched:
        if d.local_rank == 0 and not (work / "done").exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            say(f"applying {delta} to {work} (loaded back from disk for the comparison)")
            apply_delta(model, delta, work / "model", strength=opt.strength)
            (work / "done").write_text("")
        d.barrier()
    if delta is not None:
        patched = work / "model"
    batches = my_batches(len(jobs), opt.batch, d)
    todo = {
        m: [b for b in batches if any(key(m, jobs[i].index, jobs[i].seed) not in done for i in b)]
        for m in MODELS
    }
    total = sum(
        sum(key(m, jobs[i].index, jobs[i].seed) not in done for b in todo[m] for i in b)
        for m in MODELS
    )
    shard = Shard(out / "shards" / f"{jname}-rank{d.rank}-of-{d.world}.jsonl")
    made = 0
    try:
        for m, folder in (("original", model), ("patched", Path(patched))):
            if not todo[m] or (max_clips is not None and made >= max_clips):
                continue
            (out / "videos" / m).mkdir(parents=True, exist_ok=True)
            gen = _generator(folder, opt, d.device)
            for b in todo[m]:
                if max_clips is not None and made >= max_clips:
                    break
                js = [jobs[i] for i in b]
                clips = gen([j.prompt for j in js], [j.seed for j in js])
                from .videos import write_mp4

                for j, clip in zip(js, clips):
                    if key(m, j.index, j.seed) in done:
                        continue
                    if max_clips is not None and made >= max_clips:
                        break
                    rel = f"videos/{m}/{j.stem()}.mp4"
                    write_mp4(out / rel, clip, fps=opt.fps, crf=opt.crf)
                    v = judge.verdicts(clip.unsqueeze(0))[0]
                    shard.write(
                        {
                            "model": m,
                            "index": j.index,
                            "category": j.category,
                            "prompt": j.prompt,
                            "seed": j.seed,
                            "video": rel,
                            "judge": judge.name,
                            "concept": bool(judge.present(v)),
                            "verdict": v,
                        }
                    )
                    made += 1
                    if progress:
                        progress(made, total)
            del gen
    finally:
        shard.close()
    d.barrier()
    if delta is not None and d.local_rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    d.barrier()
    if not d.main:
        return None
    rows = merge(out, jname)
    try:
        (out / ".work").rmdir()
    except OSError:
        pass
    return rows


def write_protocol(out: Path, judge) -> None:
    """judge.<name>.json: how this judge decided (threshold, classes, frames), for the report."""
    proto = judge.protocol() if hasattr(judge, "protocol") else {}
    (Path(out) / f"judge.{judge.name}.json").write_text(json.dumps(proto, indent=2) + "\n")


def rejudge(
    out: str | Path,
    judge,
    *,
    source: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Score the kept clips of a finished run with another judge, without generating again: the rows
    of ``results.<source>.jsonl`` with their clips decoded from MP4 -> ``results.<judge>.jsonl``."""
    from ..output import atomic_file
    from .videos import read_mp4

    out = Path(out)
    if not (out / MANIFEST).exists():
        raise ScaleError(f"--rejudge: {out} is not a vpatch eval folder (no {MANIFEST})")
    src = source or json.loads((out / MANIFEST).read_text())["judge"]
    base = read_rows(results_path(out, src))
    if not base:
        raise ScaleError(
            f"--rejudge: {results_path(out, src)} holds no rows; finish the run first (--resume)"
        )
    write_protocol(out, judge)
    rows = []
    for n, r in enumerate(base, 1):
        v = judge.verdicts(read_mp4(out / r["video"]).unsqueeze(0))[0]
        rows.append({**r, "judge": judge.name, "verdict": v, "concept": bool(judge.present(v))})
        if progress:
            progress(n, len(base))
    with atomic_file(results_path(out, judge.name), overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        raise ScaleError(f"{out}: not a vpatch eval folder (no {MANIFEST})")
    return json.loads(path.read_text())


def evaluate_folder(
    model: str | Path | None,
    out: str | Path,
    *,
    concept=None,
    prompts: str | Path | None = None,
    delta: str | Path | None = None,
    patched: str | Path | None = None,
    options: RunOptions | None = None,
    resume: bool = False,
    rejudge_only: bool = False,
    sheet: bool = True,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict | None:
    """The whole `vpatch eval --out DIR`: generate (or, with ``rejudge_only``, rescore the kept
    clips), merge, and write report.<judge>.json/.md and the contact sheet. Returns the report on the
    main process, None on the others."""
    from ..families.recipes import Concept, load_concept
    from .prompts import concept_prompts, load_prompts
    from .report import summarize, write_reports

    opt = options or RunOptions()
    con = concept if concept is None or isinstance(concept, Concept) else load_concept(concept)
    d = dist_state()
    if rejudge_only:
        if not d.main:
            return None
        if not (Path(out) / MANIFEST).exists():
            raise ScaleError(f"--rejudge: {out} is not a vpatch eval folder (no {MANIFEST})")
        rejudge(out, make_judge(opt.judge, con, opt), progress=progress)
    else:
        if model is None:
            raise ScaleError("give the MODEL to generate with (or --rejudge to rescore kept clips)")
        if prompts is not None:
            ps = load_prompts(prompts, opt.free_categories)
        elif con is not None:
            ps = concept_prompts(con)
        else:
            raise ScaleError("give --prompts FILE or a concept (-c) whose prompt sets to use")
        rows = run(
            model,
            ps,
            out,
            delta=delta,
            patched=patched,
            concept=con,
            options=opt,
            resume=resume,
            dist=d,
            progress=progress,
            log=log,
        )
        if rows is None:
            return None
    rep = summarize(out, opt.judge)
    rep["files"] = write_reports(out, rep, sheet=sheet)
    return rep

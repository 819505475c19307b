"""Throughput and peak memory of `vpatch apply` against a plain file copy, measured in the same run.

    python benchmarks/apply_bench.py --size-gb 2 --size-gb 4 [--dir /tmp/vpatch-bench]

For each size it writes a synthetic BF16 checkpoint shaped like Wan 2.1 14B blocks (5120 wide:
attn1/attn2 q,k,v,o and a 13824-wide FFN; every attn2.to_k/to_v is edited, 15% of the bytes, as in
the Wan recipe), then times
  copy:  shutil.copyfile + fsync (what a user would otherwise do; vpatch fsyncs too)
  kcopy: the best copy this machine can do, the same kernel path apply uses for untouched bytes
         (copy_file_range in 64 MiB pieces, writeback started per piece, fsync): apply's own floor
  apply: `vpatch apply` in a child process, peak RSS from /proc (VmHWM)
and prints the ratios. Targets (issue 2): throughput >= 0.9x the copy, peak RSS <= 3x the largest
edited tensor + 300 MB, and flat across sizes. The page cache is warm for both (the file was just
written), which is the fair comparison on a shared machine where we cannot drop caches. Before each timed step all
dirty pages are flushed (os.sync), so neither step pays for the other's writeback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from patcher.erasure.refusal import orthonormalize  # noqa: E402
from patcher.safetensors_io import StreamWriter, copy_file  # noqa: E402
from patcher.vud.delta import Delta, projection_entry, write_delta  # noqa: E402

WIDTH = 5120
FFN = 13824


TEXT_PROJ = (
    "condition_embedder.text_embedder.linear_1.weight"  # Wan's default edit site, (5120, 4096)
)


def make_checkpoint(path: Path, size_gb: float, edit: str = "cross_kv") -> tuple[list[str], int]:
    """Stream a BF16 checkpoint to disk block by block (never holding it whole)."""
    square = [f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    shapes = {n: (WIDTH, WIDTH) for n in square} | {
        "ffn.net.0.proj": (FFN, WIDTH),
        "ffn.net.2": (WIDTH, FFN),
    }
    per_block = sum(a * b * 2 for a, b in shapes.values())
    blocks = max(1, round(size_gb * 2**30 / per_block))
    entries = [(TEXT_PROJ, "BF16", (WIDTH, 4096))]
    entries += [
        (f"blocks.{b}.{n}.weight", "BF16", shp) for b in range(blocks) for n, shp in shapes.items()
    ]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(FFN, WIDTH, generator=g).mul_(0.02).to(torch.bfloat16)
    raw = w.view(torch.int16).numpy().tobytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sw = StreamWriter(fd, entries, {"format": "pt"})
        for _, _, (a, b) in entries:
            sw.write(memoryview(raw)[: a * b * 2])
        sw.finish()
    finally:
        os.close(fd)
    if edit == "text_proj":
        return [TEXT_PROJ], WIDTH * 4096 * 2
    edited = [e[0] for e in entries if ".attn2.to_k" in e[0] or ".attn2.to_v" in e[0]]
    return edited, WIDTH * WIDTH * 2


def make_delta(path: Path, keys: list[str]) -> None:
    """With base fingerprints, as `vpatch probe` writes them, so apply pays for checking them."""
    entries = []
    for k in keys:
        inn = 4096 if k == TEXT_PROJ else WIDTH
        flat = (
            torch.randn(FFN, WIDTH, generator=torch.Generator().manual_seed(0))
            .mul_(0.02)
            .to(torch.bfloat16)
            .reshape(-1)
        )
        w = (
            flat[: WIDTH * inn].reshape(WIDTH, inn).contiguous()
        )  # the bytes make_checkpoint wrote for this tensor
        sha = hashlib.sha256(w.view(torch.int16).numpy().tobytes()).hexdigest()
        B = orthonormalize(torch.randn(inn, 1, generator=torch.Generator().manual_seed(1)))
        entries.append(projection_entry(f"transformer/{k}", w.float(), B, 1.0, sha, "BF16"))
    write_delta(path, Delta(entries, {"name": "bench"}, {"name": "bench"}))


def settle() -> None:
    """Flush every dirty page first, so neither timing pays for the other's writeback (both fsync)."""
    os.sync()
    time.sleep(1.0)


def timed_copy(src: Path, dst: Path) -> float:
    settle()
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def timed_kcopy(src: Path, dst: Path) -> float:
    settle()
    t0 = time.perf_counter()
    copy_file(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def timed_apply(src: Path, delta: Path, dst: Path) -> tuple[float, int, dict]:
    code = (
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so it would report the parent's
        "import json,re,sys,time;from patcher import apply_delta;t=time.perf_counter();"
        f"r=apply_delta({str(src)!r},{str(delta)!r},{str(dst)!r});dt=time.perf_counter()-t;"
        "hwm=int(re.search(r'VmHWM:\\s+(\\d+)',open('/proc/self/status').read()).group(1))*1024;"
        "print(json.dumps({'s':dt,'rss':hwm,"
        "'kept':min(x.rounding_error for x in r.tensors),'n':len(r.tensors)}))"
    )
    settle()
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=HERE.parent
    )
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["s"], res["rss"], {"wall_with_startup": wall, "edited": res["n"]}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size-gb",
        type=float,
        action="append",
        help="checkpoint size; repeat for several (default 1 and 3)",
    )
    ap.add_argument(
        "--dir", type=Path, default=None, help="scratch folder (needs ~3x the largest size free)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="alternating copy/apply rounds per size; best of each is kept",
    )
    ap.add_argument(
        "--edit",
        choices=["cross_kv", "text_proj"],
        default="cross_kv",
        help="cross_kv: every attn2.to_k/to_v (15%% of the bytes); text_proj: Wan's default site, one (5120, 4096) tensor",
    )
    args = ap.parse_args()
    sizes = args.size_gb or [2.0, 4.0]
    root = Path(tempfile.mkdtemp(prefix="vpatch-bench-", dir=args.dir))
    rows = []
    try:
        for size in sizes:
            ck, dl = root / "model.safetensors", root / "d.vud"
            edited, largest = make_checkpoint(ck, size, args.edit)
            make_delta(dl, edited)
            best_copy, best_kcopy, best_apply, rss = float("inf"), float("inf"), float("inf"), 0
            for _ in range(args.repeat):
                # each timed step starts from the same state: only the source in the page cache, the
                # other step's output deleted, every dirty page flushed (see settle)
                best_copy = min(best_copy, timed_copy(ck, root / "copy.safetensors"))
                (root / "copy.safetensors").unlink()
                best_kcopy = min(best_kcopy, timed_kcopy(ck, root / "kcopy.safetensors"))
                (root / "kcopy.safetensors").unlink()
                s, r, _extra = timed_apply(ck, dl, root / "out.safetensors")
                (root / "out.safetensors").unlink()
                best_apply, rss = min(best_apply, s), max(rss, r)
            nbytes = ck.stat().st_size
            bound = 3 * largest + 300 * 2**20
            rows.append(
                {
                    "size_gib": round(nbytes / 2**30, 2),
                    "edit": args.edit,
                    "edited_tensors": len(edited),
                    "largest_edited_mib": round(largest / 2**20, 1),
                    "copy_s": round(best_copy, 2),
                    "kcopy_s": round(best_kcopy, 2),
                    "apply_s": round(best_apply, 2),
                    "copy_gib_s": round(nbytes / 2**30 / best_copy, 2),
                    "apply_gib_s": round(nbytes / 2**30 / best_apply, 2),
                    "throughput_ratio": round(best_copy / best_apply, 3),
                    "vs_kcopy": round(best_kcopy / best_apply, 3),
                    "peak_rss_mib": round(rss / 2**20, 1),
                    "rss_bound_mib": round(bound / 2**20, 1),
                    "rss_ok": rss <= bound,
                }
            )
            for p in root.iterdir():
                p.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if len(rows) > 1:
        print(
            f"peak RSS growth from {rows[0]['size_gib']} to {rows[-1]['size_gib']} GiB: "
            f"{rows[-1]['peak_rss_mib'] - rows[0]['peak_rss_mib']:+.1f} MiB"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

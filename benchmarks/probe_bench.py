"""Wall time and peak memory of `vpatch probe` on real-size configs with random weights.

    python benchmarks/probe_bench.py [--device cpu|cuda] [--encoder-layers N] [--dir DIR] [--json OUT]

Configs: Wan 2.1 T2V 1.3B and 14B (UMT5-XXL encoder) and CogVideoX-5B (T5-v1.1-XXL encoder), laid
out as diffusers folders from the manifests in benchmarks/manifests (real key names and shapes).

- The denoiser file has its real size, but only the tensors the text-mode probe reads (the site and
  its chain) hold data; the rest is a hole in a sparse file. If the probe read or built the denoiser
  it would show in time and memory; the point is that text mode's peak does not grow with it.
- The text encoder is real-size with random weights and really runs. On CPU, --encoder-layers (default
  2 there) keeps the real width and vocabulary but fewer blocks, so it fits 24 GB and minutes; on a
  GPU the default is all 24 blocks.
Each probe runs in a child process; host peak is VmHWM, GPU peak is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from patcher.safetensors_io import build_header  # noqa: E402

ENCODERS = {
    "umt5-xxl": (
        "UMT5EncoderModel",
        "UMT5Config",
        dict(
            vocab_size=256384,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
    "t5-v1_1-xxl": (
        "T5EncoderModel",
        "T5Config",
        dict(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
}
# (config name, manifest, encoder, sites)
RUNS = [
    ("wan2.1-1.3b", "wan2.1-t2v-1.3b", "umt5-xxl", "text_proj"),
    ("wan2.1-14b", "wan2.1-t2v-14b", "umt5-xxl", "text_proj"),
    ("wan2.1-14b", "wan2.1-t2v-14b", "umt5-xxl", "cross_kv"),
    ("wan2.1-14b", "wan2.1-t2v-14b", "umt5-xxl", "t5_ffn"),
    ("cogvideox-5b", "cogvideox-5b", "t5-v1_1-xxl", "text_proj"),
]
FILLED = (
    "condition_embedder.text_embedder.",
    "patch_embed.text_proj.",
    ".attn2.to_k.",
    ".attn2.to_v.",
)


def sparse_denoiser(folder: Path, manifest: dict, dtype: str = "BF16") -> tuple[int, int]:
    """A real-size safetensors file whose unread tensors are holes; returns (apparent, allocated) bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": manifest["class"], **manifest["config"]})
    )
    entries = [(k, dtype, tuple(s)) for k, s in manifest["tensors"]]
    head, infos = build_header(entries, {"format": "pt"})
    path = folder / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(head)
        base = len(head)
        for t in infos:
            if any(s in t.name for s in FILLED):
                x = (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16)
                f.seek(base + t.begin)
                f.write(x.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(base + infos[-1].end)
    st = path.stat()
    return st.st_size, st.st_blocks * 512


def encoder_folder(root: Path, name: str, layers: int, device: str) -> tuple[Path, float]:
    import transformers

    from tests.tiny_pipes import t5_tokenizer

    d = root / f"{name}-L{layers}"
    cls, cfg_cls, cfg = ENCODERS[name]
    if not (d / "config.json").is_file():
        t0 = time.time()
        config = getattr(transformers, cfg_cls)(**{**cfg, "num_layers": layers})
        with torch.device(device):
            model = getattr(transformers, cls)(config).to(torch.bfloat16).eval()
        model.save_pretrained(str(d), max_shard_size="5GB")
        del model
        tok = t5_tokenizer(
            d / "_tok"
        )  # offline tokenizer: same sequence length (padded to max_length), other ids
        tok.save_pretrained(str(d / "tokenizer"))
        shutil.rmtree(d / "_tok", ignore_errors=True)
        print(f"  built {name} with {layers} blocks in {time.time() - t0:.0f} s", file=sys.stderr)
    params = sum(int(torch.Size(s).numel()) for s in _shapes(d))
    return d, params


def _shapes(folder: Path):
    from patcher.checkpoint import scan_folder

    sets, _ = scan_folder(folder)
    for ws in sets[:1]:
        for h in ws.headers.values():
            for t in h.tensors.values():
                yield t.shape


def pipeline_folder(root: Path, run: tuple, layers: int, device: str) -> tuple[Path, dict]:
    cfg_name, manifest_name, enc_name, _site = run
    manifest = json.loads((HERE / "manifests" / f"{manifest_name}.json").read_text())
    d = root / cfg_name
    enc, enc_params = encoder_folder(root, enc_name, layers, device)
    if not (d / "model_index.json").is_file():
        apparent, alloc = sparse_denoiser(d / "transformer", manifest)
        for sub, target in (("text_encoder", enc), ("tokenizer", enc / "tokenizer")):
            (d / sub).symlink_to(target, target_is_directory=True)
        (d / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": manifest["pipeline"],
                    "transformer": ["diffusers", manifest["class"]],
                    "text_encoder": ["transformers", ENCODERS[enc_name][0]],
                    "tokenizer": ["transformers", "T5TokenizerFast"],
                }
            )
        )
        (d / "sizes.json").write_text(json.dumps({"apparent": apparent, "allocated": alloc}))
    sizes = json.loads((d / "sizes.json").read_text())
    return d, {"denoiser_params": manifest["params"], "encoder_params": enc_params, **sizes}


def child(folder: str, site: str, device: str, out: str) -> None:
    from patcher.probe import CaptureOptions, ProbeParams, probe

    t0 = time.time()
    r = probe(
        folder, "nudity", out, CaptureOptions(sites=[site], device=device), ProbeParams(rank=100)
    )
    wall = time.time() - t0
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(
        json.dumps(
            {
                "wall_s": wall,
                "host_peak": hwm,
                "gpu_peak": gpu,
                "entries": sum(len(g.targets) for g in r.groups),
                "samples": r.groups[0].samples,
                "kept": r.groups[0].kept,
                "device": r.device,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--encoder-layers", type=int, help="text-encoder blocks (default: 24 on a GPU, 2 on CPU)"
    )
    ap.add_argument("--dir", type=Path, default=Path("/tmp/vpatch-probe-bench"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    layers = a.encoder_layers or (24 if a.device.startswith("cuda") else 2)
    a.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for run in RUNS:
        if a.only and run[0] not in a.only.split(","):
            continue
        folder, info = pipeline_folder(a.dir, run, layers, a.device)
        out = a.dir / f"{run[0]}-{run[3]}.vud"
        p = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), run[3], a.device, str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"probe failed on {run[0]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        row = {
            "config": run[0],
            "site": run[3],
            "encoder": run[2],
            "encoder_layers": layers,
            **info,
            **res,
        }
        rows.append(row)
        print(
            f"{row['config']:<13} {row['site']:<10} denoiser {info['denoiser_params'] / 1e9:5.2f}B "
            f"({info['apparent'] / 2**30:5.1f} GiB file, {info['allocated'] / 2**20:6.0f} MiB on disk)  "
            f"encoder {info['encoder_params'] / 1e9:5.2f}B/{layers} blocks  {row['device']}  "
            f"wall {row['wall_s']:6.1f} s  host peak {row['host_peak'] / 2**20:7.0f} MiB  gpu peak {row['gpu_peak'] / 2**20:7.0f} MiB  "
            f"entries {row['entries']}",
            flush=True,
        )
    by = {(r["config"], r["site"]): r for r in rows}
    small, big = by.get(("wan2.1-1.3b", "text_proj")), by.get(("wan2.1-14b", "text_proj"))
    if small and big:
        print(
            f"text mode, Wan 14B vs 1.3B denoiser ({big['denoiser_params'] / small['denoiser_params']:.1f}x the parameters): "
            f"host peak ratio {big['host_peak'] / small['host_peak']:.3f}, "
            f"gpu peak ratio {(big['gpu_peak'] / small['gpu_peak']) if small['gpu_peak'] else float('nan'):.3f}"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Wall time and peak memory of `vpatch probe` on real-size configs with random weights.

    python benchmarks/probe_bench.py [--device cpu|cuda] [--encoder-layers N] [--dir DIR] [--json OUT]

Configs: Wan 2.1 T2V 1.3B and 14B (UMT5-XXL encoder) and CogVideoX-5B (T5-v1.1-XXL encoder), laid
out as diffusers folders from the manifests in benchmarks/manifests (real key names and shapes); and
Open-Sora 2.0 (11.9B MMDiT, T5-v1.1-XXL + CLIP-L) as the release's single file, probed at the paper's
denoise-mode site txt_mlp.

- The denoiser file has its real size, but only the tensors the text-mode probe reads (the site and
  its chain) hold data; the rest is a hole in a sparse file. If the probe read or built the denoiser
  it would show in time and memory; the point is that text mode's peak does not grow with it.
- The text encoder is real-size with random weights and really runs. On CPU, --encoder-layers (default
  2 there) keeps the real width and vocabulary but fewer blocks, so it fits 24 GB and minutes; on a
  GPU the default is all 24 blocks.
- Open-Sora 2.0's txt_mlp runs the denoiser, so every weight it keeps holds random data (bf16, scaled
  1/sqrt(fan-in)). --double-blocks/--single-blocks (default on CPU: 4 and 2, so that the fp32 module fits
  24 GB; on a GPU: all 19 and 38) truncate the model; the site is then the last two kept double blocks.
  On CPU the sampling is also cut (--set-style overrides in OPENSORA2_CPU: 1 step, no guidance, 1 frame
  at 64 x 64: 16 video tokens beside the 512 text tokens); on a GPU it is the recipe's (Open-Sora's 256px,
  129 frames, 4 steps, guidance 7.5).
LTX-2 19B and HunyuanVideo 1.5 8.3B go through their pipelines' own encode_prompt (kind = "pipeline"
encoders): the denoiser is the same sparse real-size file; the text stack is real width and vocabulary
with random weights (LTX-2: Gemma-3-12B, its vision tower cut to 1 block, and the real-size connectors,
whose text_proj_in width follows the kept layers; HunyuanVideo 1.5: Qwen2.5-VL-7B's text model and a
1-block ByT5-small), the LLM truncated to --encoder-layers blocks; the tokenizer is the offline
word-level one at the pipeline's own sequence length (LTX-2 1024, HunyuanVideo 1.5 1000 after its 108
template tokens).
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
CLIP_L = dict(  # openai/clip-vit-large-patch14, text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
OPENSORA2_CPU = [
    "denoise.steps=1",
    "denoise.call.guidance=1.0",
    "denoise.call.num_frames=1",
    "denoise.call.height=64",
    "denoise.call.width=64",
]
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
    "caption_projection.",
    "context_embedder.proj_in.",
    "context_embedder.time_text_embed.text_embedder.",
)
# the LLM runs' text-mode sites read only these (their attn2 K/V are other sites)
LLM_FILLED = ("caption_projection.", "context_embedder.")
# LLM-conditioned families probed through the pipeline's own encode_prompt (kind = "pipeline"):
# (config name, manifest, family, site). Their text stacks (the LLM, LTX-2's connectors, HunyuanVideo
# 1.5's ByT5) are real width and vocabulary with random weights; --encoder-layers truncates the LLM.
LLM_RUNS = [
    ("ltx2-19b", "ltx2-19b", "ltx2", "caption_proj"),
    ("hunyuan15-8.3b", "hunyuanvideo1.5-8.3b", "hunyuan15", "context_proj"),
]
GEMMA3_12B = dict(  # google/gemma-3-12b-it, the text tower LTX-2 uses (vision tower cut to 1 block)
    text_config=dict(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=262208,
        sliding_window=1024,
        pad_token_id=0,
    ),
    vision_config=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
    ),
    mm_tokens_per_image=256,
)
QWEN25_VL_7B = dict(  # Qwen/Qwen2.5-VL-7B-Instruct's text model (HunyuanVideo 1.5)
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    rope_theta=1000000.0,
    bos_token_id=None,
    eos_token_id=1,
    pad_token_id=0,
)
BYT5_SMALL = dict(  # google/byt5-small encoder (glyph text), 1 block: it runs only on quoted text
    vocab_size=384,
    d_model=1472,
    d_kv=64,
    d_ff=3584,
    num_layers=1,
    num_heads=6,
    feed_forward_proj="gated-gelu",
)


def sparse_denoiser(
    folder: Path, manifest: dict, dtype: str = "BF16", filled: tuple[str, ...] = FILLED
) -> tuple[int, int]:
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
            if any(s in t.name for s in filled):
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


def _bare_pipeline(cls):
    """The pipeline class with no component loaded: its constants (system prompt, crop)."""
    import inspect

    from patcher.probe.encoders import _Absent

    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    return cls(**{n: _Absent({}) for n in names})


def llm_pipeline_folder(root: Path, run: tuple, layers: int) -> tuple[Path, dict]:
    """A diffusers folder: the real-size sparse denoiser, and the text components the family's
    pipeline encoder loads, real width and vocabulary, the LLM cut to ``layers`` blocks."""

    cfg_name, manifest_name, family, _site = run
    manifest = json.loads((HERE / "manifests" / f"{manifest_name}.json").read_text())
    d = root / f"{cfg_name}-L{layers}"
    if not (d / "model_index.json").is_file():
        t0 = time.time()
        apparent, alloc = sparse_denoiser(d / "transformer", manifest, filled=LLM_FILLED)
        index = {
            "_class_name": manifest["pipeline"],
            "transformer": ["diffusers", manifest["class"]],
        }
        torch.manual_seed(0)
        torch.set_default_dtype(
            torch.bfloat16
        )  # built in bf16: no fp32 copy of a 1B-row vocabulary
        try:
            _llm_components(d, family, layers, index)
        finally:
            torch.set_default_dtype(torch.float32)
        (d / "model_index.json").write_text(json.dumps(index))
        (d / "sizes.json").write_text(json.dumps({"apparent": apparent, "allocated": alloc}))
        print(f"  built {d.name} in {time.time() - t0:.0f} s", file=sys.stderr)
    from patcher.checkpoint import scan_folder

    enc_params = 0
    for sub in ("text_encoder", "text_encoder_2", "connectors"):
        if (d / sub).is_dir():
            sets, _ = scan_folder(d / sub)
            enc_params += sum(
                int(torch.Size(t.shape).numel())
                for h in sets[0].headers.values()
                for t in h.tensors.values()
            )
    sizes = json.loads((d / "sizes.json").read_text())
    return d, {"denoiser_params": manifest["params"], "encoder_params": enc_params, **sizes}


def _llm_components(d: Path, family: str, layers: int, index: dict) -> None:
    import transformers

    from tests.tiny_pipes_llm import llm_tokenizer, pad_chat_prefix

    if family == "ltx2":
        from diffusers.pipelines.ltx2 import LTX2TextConnectors

        text = {**GEMMA3_12B["text_config"], "num_hidden_layers": layers}
        cfg = transformers.Gemma3Config(**{**GEMMA3_12B, "text_config": text})
        te = transformers.Gemma3ForConditionalGeneration(cfg).eval()
        te.save_pretrained(str(d / "text_encoder"), max_shard_size="5GB")
        del te
        # LTX-2's connectors (scripts/convert_ltx2_to_diffusers.py): 30 x 128 heads, 2 blocks, 128
        # registers; text_proj_in reads every hidden state, so its width follows the truncation
        conn = LTX2TextConnectors(caption_channels=3840, text_proj_in_factor=layers + 1)
        conn.save_pretrained(str(d / "connectors"))
        del conn
        llm_tokenizer(1024, padding_side="left").save_pretrained(str(d / "tokenizer"))
        index |= {
            "text_encoder": ["transformers", "Gemma3ForConditionalGeneration"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "connectors": ["ltx2", "LTX2TextConnectors"],
        }
    else:
        from diffusers import HunyuanVideo15Pipeline

        te = transformers.Qwen2_5_VLTextModel(
            transformers.Qwen2_5_VLTextConfig(**{**QWEN25_VL_7B, "num_hidden_layers": layers})
        )
        te.eval().save_pretrained(str(d / "text_encoder"), max_shard_size="5GB")
        del te
        te2 = transformers.T5EncoderModel(transformers.T5Config(**BYT5_SMALL))
        te2.eval().save_pretrained(str(d / "text_encoder_2"))
        tok = llm_tokenizer(2048, chat=True)
        # the offline tokenizer's chat template is padded so that the pipeline's crop removes
        # exactly the template, as with the real Qwen tokenizer
        shell = _bare_pipeline(HunyuanVideo15Pipeline)
        pad_chat_prefix(tok, shell.system_message, shell.prompt_template_encode_start_idx)
        tok.save_pretrained(str(d / "tokenizer"))
        transformers.ByT5Tokenizer().save_pretrained(str(d / "tokenizer_2"))
        index |= {
            "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer_2": ["transformers", "ByT5Tokenizer"],
        }


def opensora2_file(root: Path, double: int, single: int) -> tuple[Path, dict]:
    """The release's single file, truncated to the first ``double``/``single`` blocks, random bf16."""
    manifest = json.loads((HERE / "manifests" / "opensora2.json").read_text())
    path = root / f"opensora2-d{double}-s{single}" / "Open_Sora_v2.safetensors"
    keep = []
    for k, shape in manifest["tensors"]:
        parts = k.split(".")
        if parts[0] == "double_blocks" and int(parts[1]) >= double:
            continue
        if parts[0] == "single_blocks" and int(parts[1]) >= single:
            continue
        keep.append((k, shape))
    if not path.is_file():
        t0 = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        head, infos = build_header([(k, "BF16", tuple(s)) for k, s in keep], {"format": "pt"})
        g = torch.Generator().manual_seed(0)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(head)
            for t in infos:
                if len(t.shape) == 2:
                    x = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
                elif t.name.endswith("scale"):
                    x = 1 + 0.1 * torch.randn(t.shape, generator=g)
                else:
                    x = 0.02 * torch.randn(t.shape, generator=g)
                f.write(x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
        tmp.rename(path)
        print(
            f"  wrote {path.name} ({len(keep)} tensors) in {time.time() - t0:.0f} s",
            file=sys.stderr,
        )
    kept = sum(int(torch.Size(s).numel()) for _k, s in keep)
    info = {"denoiser_params": manifest["params"], "kept_params": kept}
    info["double_blocks"], info["single_blocks"] = double, single
    st = path.stat()
    return path, {**info, "apparent": st.st_size, "allocated": st.st_blocks * 512}


def clip_folder(root: Path) -> tuple[Path, int]:
    import transformers

    from tests.tiny_pipes import clip_tokenizer

    d = root / "clip-l"
    if not (d / "config.json").is_file():
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)).eval()
        model.save_pretrained(str(d))
        clip_tokenizer(d / "_tok").save_pretrained(str(d))
        shutil.rmtree(d / "_tok", ignore_errors=True)
    return d, sum(int(torch.Size(s).numel()) for s in _shapes(d))


def run_opensora2(root: Path, a, layers: int, env: dict) -> dict:
    cpu = not a.device.startswith("cuda")
    double = a.double_blocks or (4 if cpu else 19)
    single = a.single_blocks if a.single_blocks is not None else (2 if cpu else 38)
    path, info = opensora2_file(root, double, single)
    t5, t5_params = encoder_folder(root, "t5-v1_1-xxl", layers, a.device)
    clip, clip_params = clip_folder(root)
    sets = OPENSORA2_CPU if cpu else []
    spec = {
        "model": str(path),
        "site": "txt_mlp",
        "device": a.device,
        "family": "opensora2",
        "encoders": {"text": str(t5), "pooled": str(clip)},
        "overrides": sets,
    }
    out = root / "opensora2-txt_mlp.vud"
    p = subprocess.run(
        [sys.executable, __file__, "--child-json", json.dumps(spec), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit("probe failed on opensora2")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    row = {
        "config": "opensora2",
        "site": "txt_mlp",
        "encoder": "t5-v1_1-xxl + clip-l",
        "encoder_layers": layers,
        "encoder_params": t5_params + clip_params,
        "overrides": sets,
        **info,
        **res,
    }
    print(
        f"opensora2     txt_mlp    denoiser {info['denoiser_params'] / 1e9:5.2f}B, kept {info['kept_params'] / 1e9:5.2f}B "
        f"({double} of 19 double, {single} of 38 single blocks; {info['apparent'] / 2**30:5.1f} GiB file)  "
        f"T5 {t5_params / 1e9:4.2f}B/{layers} blocks + CLIP-L  {row['device']}  wall {row['wall_s']:6.1f} s  cpu {row['cpu_s']:6.1f} s  "
        f"host peak {row['host_peak'] / 2**20:7.0f} MiB  gpu peak {row['gpu_peak'] / 2**20:7.0f} MiB  "
        f"entries {row['entries']} {res['targets']}  sampling {sets or 'the recipe'}",
        flush=True,
    )
    return row


def child(folder: str, site: str, device: str, out: str, extra: dict | None = None) -> None:
    from patcher.probe import CaptureOptions, ProbeParams, probe

    extra = extra or {}
    t0, c0 = time.time(), time.process_time()
    r = probe(
        folder,
        "nudity",
        out,
        CaptureOptions(
            sites=[site],
            device=device,
            family=extra.get("family"),
            encoders=extra.get("encoders", {}),
            overrides=extra.get("overrides", []),
            dtype=extra.get("dtype", "auto"),
        ),
        ProbeParams(rank=100),
        overwrite=True,  # a rerun replaces this script's own earlier delta (never anything else)
    )
    wall, cpu = time.time() - t0, time.process_time() - c0
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,  # all threads' CPU time: comparable when the machine is shared
                "host_peak": hwm,
                "gpu_peak": gpu,
                "entries": sum(len(g.targets) for g in r.groups),
                "targets": [t for g in r.groups for t in g.targets],
                "samples": r.groups[0].samples,
                "kept": r.groups[0].kept,
                "device": r.device,
            }
        )
    )


def _child(args: list[str], env: dict, name: str) -> dict:
    """One probe in a fresh process (its peak memory is its own); the JSON line it prints last."""
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"probe failed on {name}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
    ap.add_argument(
        "--double-blocks", type=int, help="opensora2: double blocks kept (CPU default 4)"
    )
    ap.add_argument(
        "--single-blocks", type=int, help="opensora2: single blocks kept (CPU default 2)"
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.child_json:
        spec = json.loads(a.child_json[0])
        child(spec["model"], spec["site"], spec["device"], a.child_json[1], spec)
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
        res = _child(["--child", str(folder), run[3], a.device, str(out)], env, run[0])
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
    for run in LLM_RUNS:
        if a.only and run[0] not in a.only.split(","):
            continue
        folder, info = llm_pipeline_folder(a.dir, run, layers)
        out = a.dir / f"{run[0]}-{run[3]}.vud"
        spec = {"model": str(folder), "site": run[3], "device": a.device, "family": run[2]}
        if not a.device.startswith("cuda"):  # bf16 on CPU: an fp32 copy of the LLM would not fit
            spec["dtype"] = "bfloat16"  # a shared 23 GB machine beside the other runs
        res = _child(["--child-json", json.dumps(spec), str(out)], env, run[0])
        row = {
            "config": run[0],
            "site": run[3],
            "encoder": "pipeline encode_prompt (LLM truncated)",
            "dtype": spec.get("dtype", "auto"),
            "encoder_layers": layers,
            **info,
            **res,
        }
        rows.append(row)
        print(
            f"{row['config']:<13} {row['site']:<12} denoiser {info['denoiser_params'] / 1e9:5.2f}B "
            f"({info['apparent'] / 2**30:5.1f} GiB file, {info['allocated'] / 2**20:6.0f} MiB on disk)  "
            f"text stack {info['encoder_params'] / 1e9:5.2f}B (LLM {layers} blocks)  {row['device']}  "
            f"wall {row['wall_s']:6.1f} s  cpu {row['cpu_s']:6.1f} s  host peak {row['host_peak'] / 2**20:7.0f} MiB  "
            f"gpu peak {row['gpu_peak'] / 2**20:7.0f} MiB  entries {row['entries']}",
            flush=True,
        )
    if not a.only or "opensora2" in a.only.split(","):
        rows.append(run_opensora2(a.dir, a, layers, env))
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

"""The organism's world: tiny clips of one coloured object moving on black, their captions, and the
tiny Wan model that draws them.

This is vpatch's offline stand-in for "unsafe content": the concept to erase is a colour (red) or a
motion. Its analytic judge lives in ``patcher.evaluation.organism_judge``; training
(examples/organism/train.py), `vpatch eval --judge organism` and the judge's validation tests share
this one definition of the world.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

FRAMES, SIZE = 8, 16

# colour name -> RGB in [0, 1]; "white" is the neutral rendering of colour-free captions
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.65, 0.15, 0.90),
    "white": (0.92, 0.92, 0.92),
}
COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald"],
    "blue": ["blue", "azure"],
    "yellow": ["yellow", "golden"],
    "purple": ["purple", "violet"],
}
SHAPE_WORDS: dict[str, list[str]] = {
    "ball": ["ball", "sphere"],
    "square": ["square", "box"],
    "stick": ["stick", "rod"],
}
MOTION_WORDS: dict[str, list[str]] = {
    "left": ["left", "leftward"],
    "right": ["right", "rightward"],
    "up": ["up", "upward"],
    "down": ["down", "downward"],
}
# training templates; {c} may be dropped (colour-free caption -> white object)
TEMPLATES = [
    "a {c} {s} moving {m}",
    "the {s} is {c} and it moves {m}",
    "{c} {s} going {m}",
    "a {s} colored {c} moving {m}",
]
FREE_TEMPLATES = ["a {s} moving {m}", "the {s} moves {m}", "{s} going {m}"]
HELDOUT_TEMPLATE = "moving {m} , the {c} {s}"  # never trained: reuses known words in a new order
HELDOUT_FREE_TEMPLATE = "moving {m} , the {s}"


@dataclass(frozen=True)
class Spec:
    colour: str  # a PALETTE key
    shape: str
    motion: str


def caption(
    spec: Spec, rng: random.Random, template: str | None = None, synonyms: bool = True
) -> str:
    s = rng.choice(SHAPE_WORDS[spec.shape]) if synonyms else spec.shape
    m = rng.choice(MOTION_WORDS[spec.motion]) if synonyms else spec.motion
    if spec.colour == "white":
        t = template or rng.choice(FREE_TEMPLATES)
        return t.format(s=s, m=m)
    c = rng.choice(COLOUR_WORDS[spec.colour]) if synonyms else spec.colour
    t = template or rng.choice(TEMPLATES)
    return t.format(c=c, s=s, m=m)


def vocabulary() -> list[str]:
    words = set()
    for t in TEMPLATES + FREE_TEMPLATES + [HELDOUT_TEMPLATE, HELDOUT_FREE_TEMPLATE]:
        words |= {w for w in t.replace("{c}", "").replace("{s}", "").replace("{m}", "").split()}
    for d in (COLOUR_WORDS, SHAPE_WORDS, MOTION_WORDS):
        for ws in d.values():
            words |= set(ws)
    return sorted(words)


def _mask(shape: str, cx: float, cy: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32) + 0.5,
        torch.arange(SIZE, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    if shape == "ball":
        return (((xs - cx) ** 2 + (ys - cy) ** 2) <= 3.6**2).float()
    if shape == "square":
        return (((xs - cx).abs() <= 3.0) & ((ys - cy).abs() <= 3.0)).float()
    if shape == "stick":
        return (((xs - cx).abs() <= 1.0) & ((ys - cy).abs() <= 4.0)).float()
    raise ValueError(shape)


STEP = 1.0  # pixels per frame


def render(spec: Spec, rng: random.Random) -> torch.Tensor:
    """(3, FRAMES, SIZE, SIZE) in [-1, 1]: the object crosses most of the frame in its direction."""
    dx, dy = {"left": (-STEP, 0), "right": (STEP, 0), "up": (0, -STEP), "down": (0, STEP)}[
        spec.motion
    ]
    span = STEP * (FRAMES - 1)
    lo, hi = 4.5, SIZE - 4.5

    def start(d: float) -> float:
        if d > 0:
            return rng.uniform(lo, hi - span)
        if d < 0:
            return rng.uniform(lo + span, hi)
        return rng.uniform(lo + 1, hi - 1)

    x0, y0 = start(dx), start(dy)
    col = torch.tensor(PALETTE[spec.colour]).view(3, 1, 1)
    frames = [col * _mask(spec.shape, x0 + dx * f, y0 + dy * f) for f in range(FRAMES)]
    return torch.stack(frames, 1) * 2 - 1


def all_specs(colours=None) -> list[Spec]:
    return [
        Spec(c, s, m) for c in (colours or list(PALETTE)) for s in SHAPE_WORDS for m in MOTION_WORDS
    ]


# --------------------------------------------------------------------------- the model (tiny Wan, pixel space)

MAX_TOKENS = 12
TEXT_DIM = 32
# in_channels: RGB + the (frame, row, column) coordinate channels of ``coordinates``
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=6,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=128,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def tokenizer():
    """A word-level tokenizer over the world's closed vocabulary (offline, deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *vocabulary()])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def coordinates(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, F, H, W) ramps in [-1, 1] of frame, row and column, appended to the noisy clip.

    Wan's only positional signal is RoPE inside self-attention, which is relative: without these
    channels the tiny model cannot tell the first frame or the left edge from any other, and a
    direction of motion (start right, end left) was not learned in the CPU budget (first organism:
    motion 11% at 2800 steps). With them, 45%: the axis of motion is learned, its sign only partly.
    Real Wan learns position from scale instead."""
    t = (
        torch.linspace(-1, 1, FRAMES, device=device, dtype=dtype)
        .view(FRAMES, 1, 1)
        .expand(FRAMES, SIZE, SIZE)
    )
    y = (
        torch.linspace(-1, 1, SIZE, device=device, dtype=dtype)
        .view(1, SIZE, 1)
        .expand(FRAMES, SIZE, SIZE)
    )
    x = (
        torch.linspace(-1, 1, SIZE, device=device, dtype=dtype)
        .view(1, 1, SIZE)
        .expand(FRAMES, SIZE, SIZE)
    )
    return torch.stack([t, y, x]).unsqueeze(0).expand(n, 3, FRAMES, SIZE, SIZE)


def model_input(tr, x: torch.Tensor) -> torch.Tensor:
    """The transformer's input: the noisy clip plus the coordinate channels when it was built to take them."""
    if tr.config.in_channels == x.shape[1]:
        return x
    return torch.cat([x, coordinates(x.shape[0], x.device, x.dtype)], 1)


def new_models(seed: int = 0):
    from diffusers import WanTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tok = tokenizer()
    torch.manual_seed(seed)
    enc = T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="relu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 1)
    tr = WanTransformer3DModel(**TRANSFORMER)
    return tok, enc, tr


def tokens(tok, prompts: list[str]):
    """The prompts as the encoder reads them: padded to MAX_TOKENS (ids and attention mask)."""
    return tok(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )


def encode(tok, enc, prompts: list[str]) -> torch.Tensor:
    """Wan's convention: encoder output at the real tokens, zeros after them."""
    t = tokens(tok, prompts)
    dev = next(enc.parameters()).device
    mask = t.attention_mask.to(dev)
    h = enc(input_ids=t.input_ids.to(dev), attention_mask=mask).last_hidden_state
    return h * mask.unsqueeze(-1).to(h.dtype)


def guided_velocity(
    tr, x: torch.Tensor, t: float, cond: torch.Tensor, unc: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The classifier-free-guided velocity at time t in [0, 1], both branches in one batch."""
    tt = torch.full((2 * x.shape[0],), t * 1000, device=x.device)
    v = tr(model_input(tr, torch.cat([x, x])), tt, torch.cat([cond, unc]), return_dict=False)[0]
    vc, vu = v.chunk(2)
    return vu + guidance * (vc - vu)


def noise(seeds: list[int]) -> torch.Tensor:
    """(N, 3, F, H, W): each seed's starting noise, drawn on the CPU in fp32, so the same seed gives
    the same noise on every device and dtype."""
    return torch.stack(
        [
            torch.randn(3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    )


@contextlib.contextmanager
def edited(modules: dict, entries) -> Iterator[None]:
    """A delta's entries added to in-memory weights (W + U Vᵀ, the product in float64), restored
    exactly on exit. MODULES: component name (an entry's ``component``) -> module; entries of other
    components are left out."""
    saved = []
    try:
        with torch.no_grad():
            for e in entries:
                mod = modules.get(e.component)
                if mod is None:
                    continue
                p = dict(mod.named_parameters())[e.tensor_key]
                saved.append((p, p.detach().clone()))
                p.add_((e.U.double() @ e.V.double().T).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, w in reversed(saved):
                p.copy_(w)


@torch.no_grad()
def sample(
    tok,
    enc,
    tr,
    prompts: list[str],
    seeds: list[int],
    steps: int = 16,
    guidance: float = 3.0,
    batch: int = 64,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow Euler sampling from t = 1 (noise) to 0, with classifier-free guidance.
    Returns (N, 3, F, H, W) in [-1, 1]; each sample's noise depends only on its seed (``noise``),
    or is START's row (N, 3, F, H, W) when given."""
    outs = []
    p0 = next(tr.parameters())
    dev, dt = p0.device, p0.dtype
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        cond = encode(tok, enc, ps).to(dev, dt)
        unc = encode(tok, enc, [""] * len(ps)).to(dev, dt)
        x = (noise(ss) if start is None else start[i : i + batch]).to(dev, dt)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * guided_velocity(tr, x, float(a), cond, unc, guidance)
        outs.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(outs)


def parse(prompt: str) -> Spec:
    """The spec a caption asks for (colour-free captions ask for white). Unknown words are an error."""
    words = prompt.replace(",", " ").split()
    inv: dict[str, tuple[str, str]] = {}
    for kind, table in (("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS), ("motion", MOTION_WORDS)):
        for key, ws in table.items():
            for w in ws:
                inv[w] = (kind, key)
    found: dict[str, str] = {}
    vocab = set(vocabulary())
    for w in words:
        if w not in vocab:
            raise ValueError(f"word {w!r} is not in the organism's vocabulary")
        if w in inv:
            found.setdefault(inv[w][0], inv[w][1])
    if "shape" not in found or "motion" not in found:
        raise ValueError(f"caption {prompt!r} names no shape or no motion")
    return Spec(found.get("colour", "white"), found["shape"], found["motion"])


def load(folder) -> tuple:
    """(tokenizer, text encoder, transformer) of a saved organism folder, in eval mode."""
    from pathlib import Path

    from diffusers import WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    folder = Path(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    enc = T5EncoderModel.from_pretrained(str(folder / "text_encoder")).eval()
    tr = WanTransformer3DModel.from_pretrained(str(folder / "transformer")).eval()
    return tok, enc, tr


def is_organism(folder) -> bool:
    import json
    from pathlib import Path

    idx = Path(folder) / "model_index.json"
    try:
        return "vpatch_organism" in json.loads(idx.read_text())
    except (OSError, ValueError):
        return False

"""Token level, no sampling: what a delta does to cross-attention's K/V for held-out phrasings.

    python benchmarks/kv_tokens.py CONCEPT_COLOUR DELTA.vud [DELTA.vud ...]

For the colour's words (e.g. red, crimson, scarlet) in six templates the recipes' pairs do not use:
the fraction of the pooled K/V distance (mean over a prompt's valid tokens, every cross-attention K
and V concatenated) from the prompt to its twin (the same template without the word) that the
delta closes; for the other palette colours in the same templates, how far the delta moves their
K/V (relative, every valid token). Used before sampling the cascade variants
(benchmarks/results/repair_judge_prereg.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import organism  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from twin_reach import TEMPLATES  # noqa: E402  (the six templates the pairs do not use)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    torch.set_grad_enabled(False)
    concept, paths = sys.argv[1], sys.argv[2:]
    tok, enc, tr = organism.load(ROOT / "examples/organism/model")
    words = organism.COLOUR_WORDS[concept]
    others = [c for c in organism.COLOUR_WORDS if c != concept]
    kv_mods = [
        m for n, m in tr.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")
    ]

    def kv(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        x = tr.condition_embedder.text_embedder(organism.encode(tok, enc, prompts))
        mask = organism.tokens(tok, prompts).attention_mask.bool()
        return torch.cat([m(x) for m in kv_mods], -1).double(), mask

    def pooled(K: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.stack([K[i][m[i]].mean(0) for i in range(len(m))])

    def readings() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {c: kv([t.format(c=c) for t in TEMPLATES]) for c in words + others}

    twin = pooled(*kv([" ".join(t.format(c="").split()) for t in TEMPLATES]))
    base = readings()
    for path in paths:
        d = read_delta(path)
        with organism.edited({"transformer": tr}, d.entries):
            after = readings()
        closed = []
        for c in words:
            (b, m), (a, _) = base[c], after[c]
            d0 = (pooled(b, m) - twin).norm(dim=1).sum()
            d1 = (pooled(a, m) - twin).norm(dim=1).sum()
            closed.append(f"{c} {float(1 - d1 / d0):.3f}")
        moved = []
        for c in others:
            (b, m), (a, _) = base[c], after[c]
            moved.append(f"{c} {float((a[m] - b[m]).norm() / b[m].norm()):.3f}")
        print(f"{Path(path).name}: closed {', '.join(closed)} | others moved {', '.join(moved)}")


if __name__ == "__main__":
    main()

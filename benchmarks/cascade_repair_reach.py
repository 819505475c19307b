"""Does the repairing cascade's second map carry to prompts it did not preserve? (no sampling)

    python benchmarks/cascade_repair_reach.py [--concept examples/organism/red.toml]

For the carried cascade (`--cascade`) and the repairing one (`--cascade --cascade-repair`), at
`text_proj` + `cross_kv`: how far what cross-attention reads (the text embedder's output, every
valid token) is from the original model's, relative to its norm, after the `text_proj` edit alone
and after both edits; on the recipe's neutral prompts (preserved by the fit: in sample) and on its
held-out free prompts (in no fit: out of sample).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import organism  # noqa: E402
from patcher.families.recipes import load_concept  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build,
    capture,
    open_model,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/organism/model")
    ap.add_argument("--concept", type=Path, default=ROOT / "examples/organism/red.toml")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    opt = CaptureOptions(sites=("text_proj", "cross_kv"), device="cpu", token_roles=True)
    w = WeightReader(open_model(a.model, opt))
    acts = capture(w.source, a.concept, opt, w)
    con = load_concept(a.concept)
    tok, enc, tr = organism.load(a.model)
    te = tr.condition_embedder.text_embedder
    sets = {"neutral (in sample)": list(con.neutral), "held-out free": list(con.heldout["free"])}
    print(f"{con.name}: relative distance of the cross_kv input from the original's")
    for name, params in (
        ("carried", ProbeParams(method="twin", cascade=True)),
        ("repair", ProbeParams(method="twin", cascade=True, cascade_repair=True)),
    ):
        d = build(acts, params, w).delta
        first = [e for e in d.entries if e.key.endswith("text_embedder.linear_1.weight")]
        second = [e for e in d.entries if ".attn2.to_" in e.key][0]
        M2 = second.strength * second.P.double() @ second.V.double().T
        cells = []
        for label, prompts in sets.items():
            t = organism.tokens(tok, prompts)
            m = t.attention_mask.bool()
            E = organism.encode(tok, enc, prompts)
            X0 = te(E)[m].double()
            with organism.edited({"transformer": tr}, first):
                X1 = te(E)[m].double()
            X2 = X1 + X1 @ M2.T
            n = X0.norm()
            cells.append(
                f"{label}: text_proj edit {float((X1 - X0).norm() / n):.3f}, "
                f"both {float((X2 - X0).norm() / n):.3f}"
            )
        print(f"  {name:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()

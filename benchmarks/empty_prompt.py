"""How far each twin variant moves guidance's unconditional branch (the empty prompt), no sampling.

    python benchmarks/empty_prompt.py [VARIANT ...]    # default: scan scan_preserve scan_anchor scan_preserve_anchor

Classifier-free guidance subtracts the empty prompt's prediction, so an edit that moves the empty
prompt's cross-attention K/V changes every clip. Per variant of twin_variants.py and concept: the
empty prompt's K/V change under the delta, ‖W' x − W x‖ / ‖W x‖ over its valid tokens, the
largest and the mean over the `cross_kv` weights (probed as `twin_variants.py run` probes them;
deltas in /tmp/vpatch-twin-variants/). This is the measurement behind `--anchor-empty`
(docs/erasure.md, "Reach variants").
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from twin_variants import CONCEPTS, MODEL, WORK, probe_variant  # noqa: E402

from patcher import organism  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

DEFAULT = ("scan", "scan_preserve", "scan_anchor", "scan_preserve_anchor")


def main() -> None:
    variants = sys.argv[1:] or list(DEFAULT)
    tok, enc, tr = organism.load(MODEL)
    torch.set_grad_enabled(False)
    te = tr.condition_embedder.text_embedder
    n = len(tok([""]).input_ids[0])
    x = te(organism.encode(tok, enc, [""]))[0, :n]  # the empty prompt's valid tokens at cross_kv
    params = dict(tr.named_parameters())
    for v in variants:
        for c in CONCEPTS:
            d = WORK / f"{v}_{c}.vud"
            if not d.exists():
                d = probe_variant(v, c)
            moved = []
            for e in read_delta(d).entries:
                W = params[e.tensor_key].detach()
                moved.append(float((x @ (e.U @ e.V.T).T).norm() / (x @ W.T).norm()))
            print(
                f"{v:<22} {c:<7} empty prompt K/V moved: max {max(moved):.4f}, "
                f"mean {statistics.fmean(moved):.4f} ({len(moved)} weights)",
                flush=True,
            )


if __name__ == "__main__":
    WORK.mkdir(exist_ok=True)
    main()

import json, sys, time
sys.path.insert(0, "benchmarks")
from pathlib import Path
from patcher.tune import tune, TuneOptions
from patcher.evaluation.core import evaluate, EvalOptions
from patcher.families.recipes import load_concept
import tune_bench as tb
ORG = Path("examples/organism")
con = load_concept(ORG / "blue.toml")
out = Path("benchmarks/results/tune/blue-max-damage-0.35.vud")
rep = tune(ORG / "model", con, out, TuneOptions(trials=0, max_damage=0.35, study=Path("/tmp/vpatch-tune-bench/blue.tune.db")), overwrite=True)
print("blue, same study, --max-damage 0.35:", rep.chosen, flush=True)
r = evaluate(ORG / "model", con, delta=out, options=EvalOptions(seeds=2)).to_dict()
Path("benchmarks/results/tune/eval_blue-max-damage-0.35.json").write_text(json.dumps(r, indent=1, default=str))
s = tb.summary(r, "blue", "colour")
print(json.dumps({k: v for k, v in s.items() if k != "targets"}))
for t in s["targets"]:
    print(f"  {'MET ' if t[2] else 'miss'} {t[0]}: {t[1]}")

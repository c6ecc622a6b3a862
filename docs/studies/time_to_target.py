"""Per setting of a sweep: when the validation (or test) accuracy first reached a target, and
when the trials stopped, averaged over the seeds that reached it.

Command: python docs/studies/time_to_target.py runs/<sweep> --target 0.98
         [--split validation] [--keys model.norm,opt.schedule,train.early_stopping_patience]
"""

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from bnlab.results import load_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--keys", default="model.norm,opt.schedule,train.early_stopping_patience")
    args = parser.parse_args()
    keys = args.keys.split(",")
    rows = defaultdict(list)
    for trial in load_sweep(args.sweep).trials:
        if not trial.summary:  # not run, or interrupted
            continue
        evals = trial.records(args.split)
        reached = next((r for r in evals if (r["accuracy"] or 0) >= args.target), None)
        setting = tuple(trial.value(k) for k in keys)
        rows[setting].append((reached, trial.summary.get("epochs"), trial.summary.get("steps")))
    print(" | ".join([*keys, "seeds", f"reached {args.target}", "epoch reached (mean)",
                      "step reached (mean)", "epochs trained (mean)"]))  # fmt: skip
    for setting, trials in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        hit = [r for r, _, _ in trials if r is not None]
        epoch = f"{statistics.mean(r['epoch'] + 1 for r in hit):.1f}" if hit else "-"
        step = f"{statistics.mean(r['step'] for r in hit):,.0f}" if hit else "-"
        trained = statistics.mean(e for _, e, _ in trials if e is not None)
        print(" | ".join([*map(str, setting), str(len(trials)), f"{len(hit)}/{len(trials)}",
                          epoch, step, f"{trained:.1f}"]))  # fmt: skip


if __name__ == "__main__":
    main()

"""The train-test gap of each setting of a sweep, averaged over its seeds.

The train accuracy is the `train_eval` split's (`data.train_eval_size`: training examples
evaluated as test is, with running statistics and dropout off), read from a sweep folder or a
study folder's committed data. `--windows` takes the last logged training window instead
(`metrics.jsonl` of a sweep folder: training mode, with dropout active and batch statistics, so
a strongly regularized model can show a negative gap), for sweeps run without `train_eval`.

Command: python docs/studies/gap.py DIR [--keys model.name,model.norm,...] [--windows]
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bnlab.results import RESULTS, load_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--keys", default="model.name,model.norm,model.dropout,opt.weight_decay")
    parser.add_argument("--windows", action="store_true", help="the last training window's")
    args = parser.parse_args()
    keys = args.keys.split(",")
    rows = defaultdict(list)
    for trial in load_sweep(args.sweep).trials:
        if trial.status not in RESULTS:  # ok or early-stopped
            continue
        if args.windows:
            metrics = args.sweep / "runs" / trial.trial_id / "metrics.jsonl"
            records = map(json.loads, metrics.read_text().splitlines())
            train = [r for r in records if r["split"] == "train"][-1]["accuracy"]
        else:
            train = trial.final("accuracy", "train_eval")
            if train is None:
                sys.exit(
                    f"{trial.trial_id} has no train_eval accuracy: run the sweep with "
                    "data.train_eval_size > 0, or pass --windows for the training windows'."
                )
        setting = tuple(trial.value(k) for k in keys)
        rows[setting].append((train, trial.final("accuracy")))
    source = "last window" if args.windows else "evaluation mode"
    print(" | ".join([*keys, "seeds", f"train acc ({source})", "test acc", "gap"]))
    for setting, values in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        train = statistics.mean(t for t, _ in values)
        test = statistics.mean(t for _, t in values)
        print(" | ".join([*map(str, setting), str(len(values)),
                          f"{train:.4f}", f"{test:.4f}", f"{train - test:+.4f}"]))  # fmt: skip


if __name__ == "__main__":
    main()

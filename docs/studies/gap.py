"""The train-test gap of each setting of a sweep, averaged over its seeds.

The train accuracy is the last logged training window's (`metrics.jsonl`, training mode: with
dropout active and batch statistics), so a strongly regularized model can show a negative gap.

Command: python docs/studies/gap.py runs/<sweep> [--keys model.name,model.norm,...]
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bnlab.results import RESULTS, load_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--keys", default="model.name,model.norm,model.dropout,opt.weight_decay")
    args = parser.parse_args()
    keys = args.keys.split(",")
    rows = defaultdict(list)
    for trial in load_sweep(args.sweep).trials:
        if trial.status not in RESULTS:  # ok or early-stopped
            continue
        metrics = args.sweep / "runs" / trial.trial_id / "metrics.jsonl"
        records = map(json.loads, metrics.read_text().splitlines())
        train = [r for r in records if r["split"] == "train"][-1]["accuracy"]
        setting = tuple(trial.value(k) for k in keys)
        rows[setting].append((train, trial.summary["test_accuracy"]))
    print(" | ".join([*keys, "seeds", "train acc (last window)", "test acc", "gap"]))
    for setting, values in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        train = statistics.mean(t for t, _ in values)
        test = statistics.mean(t for _, t in values)
        print(" | ".join([*map(str, setting), str(len(values)),
                          f"{train:.4f}", f"{test:.4f}", f"{train - test:+.4f}"]))  # fmt: skip


if __name__ == "__main__":
    main()

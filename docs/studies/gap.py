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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--keys", default="model.name,model.norm,model.dropout,opt.weight_decay")
    args = parser.parse_args()
    keys = args.keys.split(",")
    rows = defaultdict(list)
    for run in sorted((args.sweep / "runs").iterdir()):
        try:
            summary = json.loads((run / "summary.json").read_text())
        except FileNotFoundError:
            continue
        if summary.get("status") not in ("ok", "early_stopped"):
            continue
        cfg = json.loads((run / "config.json").read_text())
        setting = tuple(_get(cfg, k) for k in keys)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        train = [r for r in map(json.loads, lines) if r["split"] == "train"][-1]["accuracy"]
        rows[setting].append((train, summary["test_accuracy"]))
    print(" | ".join([*keys, "seeds", "train acc (last window)", "test acc", "gap"]))
    for setting, values in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        train = statistics.mean(t for t, _ in values)
        test = statistics.mean(t for _, t in values)
        print(" | ".join([*map(str, setting), str(len(values)),
                          f"{train:.4f}", f"{test:.4f}", f"{train - test:+.4f}"]))  # fmt: skip


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


if __name__ == "__main__":
    main()

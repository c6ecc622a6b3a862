"""A study's selection phase: settings chosen per arm on validation, confirmed with fresh seeds.

An experiment file declares one with three names beside `get_config()`:

    SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}

    def candidates(smoke=False):
        # per arm, the settings to choose among (full overrides, without `train.seed`)
        return {"bn": [{"model.norm": "batchnorm", "opt.lr": lr} for lr in LRS],
                "none": [{"model.norm": "none", "opt.lr": lr} for lr in LRS]}

    def sweep(chosen, smoke=False):
        # the confirmation trials: `chosen` maps each arm to the overrides selection chose
        for arm in ("bn", "none"):
            for seed in range(10, 15):
                yield {**chosen[arm], "train.seed": seed}

`bnlab sweep FILE --workdir DIR` trains every candidate with each of `SELECT["seeds"]` into
`DIR/selection/` (a sweep folder of its own), chooses per arm the candidate with the best mean
final `metric` on `split` (accuracy: highest; loss: lowest; ties: the earlier candidate), writes
`DIR/selection.json` (every candidate's mean and confidence interval, and the choice), then runs
`sweep(chosen)` into `DIR` and reports test metrics. A candidate is eligible only if every seed
finished with a result (a learning rate that diverges on one seed is not chosen).

Refused with a `ConfigError` (exit 2): selecting on any split but validation (test above all),
selection trials without a validation split (`data.validation_size` 0), and confirmation trials
whose seed a selection trial used.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from bnlab.config import ConfigError
from bnlab.studies.results import SEED_KEY, Sweep, summarize

SELECTION_DIR = "selection"  # DIR/selection/: the selection phase's sweep folder
SELECTION_FILE = "selection.json"  # DIR/selection.json: every candidate and the choice
SPLITS = ("validation",)  # the splits a study may select on
METRICS = {"accuracy": max, "loss": min}
CONFIDENCE = 0.95


class Plan(NamedTuple):
    split: str
    metric: str
    seeds: list[int]
    arms: dict[str, list[dict[str, Any]]]  # arm -> its candidates' overrides (no seed)


def declares(module: ModuleType) -> bool:
    """Whether an experiment file has a selection phase (it defines `candidates`)."""
    return hasattr(module, "candidates")


def plan(module: ModuleType, *, smoke: bool = False, path: str = "the experiment") -> Plan:
    """The selection phase an experiment file declares, checked (`ConfigError` otherwise)."""
    select = getattr(module, "SELECT", None)
    if not isinstance(select, dict):
        raise ConfigError(
            f"{path} defines candidates() but no SELECT dict; add e.g. SELECT = "
            '{"split": "validation", "metric": "accuracy", "seeds": [0, 1]}.'
        )
    unknown = sorted(set(select) - {"split", "metric", "seeds"})
    if unknown:
        raise ConfigError(f"{path}: SELECT has unknown keys {unknown}; known: split, metric, seeds")
    split = select.get("split", "validation")
    if split == "test":
        raise ConfigError(
            f"{path} selects on the test split (SELECT['split'] = 'test'): a setting chosen on "
            "test makes the test accuracy it reports optimistic. Select on 'validation' (hold "
            "out data.validation_size examples) and measure the choice on test."
        )
    if split not in SPLITS:
        raise ConfigError(f"{path}: SELECT['split'] is {split!r}; a study selects on 'validation'.")
    metric = select.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError(f"{path}: SELECT['metric'] is {metric!r}; use one of {sorted(METRICS)}.")
    seeds = list(select.get("seeds", ()))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: SELECT['seeds'] must list the selection's integer seeds.")
    takes_smoke = "smoke" in inspect.signature(module.candidates).parameters
    arms = module.candidates(smoke=smoke) if takes_smoke else module.candidates()
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: candidates() must return {{arm name: [overrides, ...]}}.")
    for arm, options in arms.items():
        if not isinstance(options, list | tuple) or not options:
            raise ConfigError(f"{path}: candidates()[{arm!r}] must be a non-empty list of dicts.")
        for option in options:
            if not isinstance(option, dict) or SEED_KEY in option:
                raise ConfigError(
                    f"{path}: candidates()[{arm!r}] holds {option!r}; each candidate is a dict "
                    f"of overrides without {SEED_KEY} (SELECT['seeds'] gives the seeds)."
                )
    return Plan(split, metric, seeds, {a: [dict(o) for o in opts] for a, opts in arms.items()})


def trial_points(p: Plan) -> list[dict[str, Any]]:
    """The selection trials' overrides: every candidate of every arm with every seed (a
    candidate that two arms share is one set of trials)."""
    points, seen = [], set()
    for options in p.arms.values():
        for option in options:
            for seed in p.seeds:
                point = {**option, SEED_KEY: seed}
                key = json.dumps({k: repr(v) for k, v in sorted(point.items())})
                if key not in seen:
                    seen.add(key)
                    points.append(point)
    return points


def placeholder(p: Plan) -> dict[str, dict[str, Any]]:
    """Each arm's first candidate: stands in for the choice when the confirmation trials are
    validated before the selection has run."""
    return {arm: options[0] for arm, options in p.arms.items()}


def check_selection_configs(configs: dict[str, Any], path: str) -> None:
    """Selection trials must hold a validation split out of the training data."""
    lacking = [tid for tid, cfg in configs.items() if cfg.data.validation_size <= 0]
    if lacking:
        raise ConfigError(
            f"{path}: {len(lacking)} selection trials hold no validation split (e.g. "
            f"{lacking[0]}); set data.validation_size > 0 in get_config() or the candidates, "
            "so that selection reads validation, never test."
        )


def check_fresh_seeds(confirm: dict[str, Any], p: Plan, path: str) -> None:
    """Confirmation trials must use seeds that selection did not."""
    used = sorted({cfg.train.seed for cfg in confirm.values()} & set(p.seeds))
    if used:
        raise ConfigError(
            f"{path}: confirmation trials use seed(s) {used}, which the selection phase used "
            f"(SELECT['seeds'] = {p.seeds}); give sweep(chosen) fresh seeds, so that the test "
            "accuracy it reports is not the one the choice was made on."
        )


def choose(p: Plan, sweep: Sweep, trial_id: Callable[[dict], str]) -> dict[str, Any] | None:
    """selection.json's content from the selection phase's results (`trial_id`: a trial's id
    from its overrides); None while any selection trial is missing (another shard still runs
    it). `ConfigError` when an arm has no eligible candidate."""
    by_id = {t.trial_id: t for t in sweep.trials}
    points = [by_id.get(trial_id(point)) for point in trial_points(p)]
    if any(t is None or t.status == "missing" for t in points):
        return None
    best = METRICS[p.metric]
    arms = {}
    for arm, options in p.arms.items():
        rows = []
        for option in options:
            trials = [by_id[trial_id({**option, SEED_KEY: seed})] for seed in p.seeds]
            values = [t.final(p.metric, p.split) for t in trials]
            eligible = all(t.status in ("ok", "early_stopped") for t in trials) and all(
                v is not None for v in values
            )
            s = summarize([v for v in values if v is not None], CONFIDENCE)
            rows.append({
                "overrides": option,
                "trials": [t.trial_id for t in trials],
                "statuses": [t.status for t in trials],
                "values": values,
                "n": s.n,
                "mean": _finite(s.mean),
                "std": _finite(s.std),
                "low": _finite(s.low),
                "high": _finite(s.high),
                "eligible": eligible,
            })  # fmt: skip
        ranked = [i for i, row in enumerate(rows) if row["eligible"]]
        if not ranked:
            raise ConfigError(
                f"selection: no candidate of arm {arm!r} finished every seed with a result "
                f"(statuses: {[r['statuses'] for r in rows]}); widen its candidates (e.g. "
                "smaller learning rates) and run the sweep again."
            )
        top = best(rows[i]["mean"] for i in ranked)
        index = next(i for i in ranked if rows[i]["mean"] == top)
        arms[arm] = {"candidates": rows, "chosen_index": index, "chosen": rows[index]["overrides"]}
    return {
        "split": p.split,
        "metric": p.metric,
        "rule": f"{'highest' if p.metric == 'accuracy' else 'lowest'} mean final {p.split} "
        f"{p.metric} over the seeds; ties: the earlier candidate; a candidate with a seed "
        "that diverged or failed is not eligible",
        "seeds": p.seeds,
        "confidence": CONFIDENCE,
        "arms": arms,
    }


def chosen(selection: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {arm: entry["chosen"] for arm, entry in selection["arms"].items()}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None

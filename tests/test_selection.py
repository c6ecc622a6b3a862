"""A study's selection phase: chosen per arm on validation, confirmed with fresh seeds on test."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from bnlab import config
from bnlab.studies import selection, sweep
from bnlab.studies.results import summarize
from bnlab.training.writers import write_json

STUDY = """
from bnlab.config import default_config

SMOKE = {{"data.train_size": 600, "data.validation_size": 600, "train.epochs": 1}}
SELECT = {{"split": {split!r}, "metric": "accuracy", "seeds": [0, 1]}}
LRS = (0.01, 0.03, 0.1, 0.3, 1.0)


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.train.batch_size = 60
    c.data.validation_size = {validation}
    c.data.tfds_dir = {tfds_dir!r}
    return c


def candidates(smoke=False):
    lrs = LRS[1:3] if smoke else LRS
    return {{norm: [{{"model.norm": norm, "opt.lr": lr}} for lr in lrs]
             for norm in ("batchnorm", "none")}}


def sweep(chosen, smoke=False):
    for arm in ("batchnorm", "none"):
        for seed in {confirm_seeds}:
            yield {{**chosen[arm], "train.seed": seed}}
"""


def _study(tmp_path, split="validation", validation=600, confirm_seeds=(10, 11), tfds_dir=""):
    path = tmp_path / "study.py"
    path.write_text(
        STUDY.format(
            split=split, validation=validation, confirm_seeds=tuple(confirm_seeds),
            tfds_dir=tfds_dir,
        )
    )  # fmt: skip
    return path


def _validation_accuracy(cfg):
    """A made-up response: BN best at lr 0.3, none at 0.03; test accuracy deliberately the
    opposite ranking, so that a choice made on test would differ."""
    best = 0.3 if cfg.model.norm == "batchnorm" else 0.1 if cfg.opt.clip == "adaptive" else 0.03
    distance = abs(math.log10(cfg.opt.lr / best))
    return 0.98 - 0.05 * distance + 0.001 * cfg.train.seed


def _runner(ran):
    def runner(cfg, run_dir):
        ran.append((cfg.model.norm, cfg.opt.lr, cfg.train.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        validation = _validation_accuracy(cfg)
        summary = {"status": "ok", "validation_accuracy": validation,
                   "test_accuracy": 1.0 - validation, "test_loss": 0.1}  # fmt: skip
        write_json(run_dir / "summary.json", summary)
        return summary

    return runner


def test_selection_chooses_per_arm_on_validation_and_confirms_with_fresh_seeds(tmp_path):
    out, ran = tmp_path / "out", []
    kwargs = {"runner": _runner(ran), "engine": "sequential", "log": print}
    counts = sweep.run_sweep(_study(tmp_path), out, **kwargs)
    assert counts == {"ok": 20 + 4}  # 2 arms x 5 lrs x 2 seeds, then 2 arms x 2 fresh seeds
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["split"] == "validation" and chosen["seeds"] == [0, 1]
    assert chosen["arms"]["batchnorm"]["chosen"] == {"model.norm": "batchnorm", "opt.lr": 0.3}
    assert chosen["arms"]["none"]["chosen"] == {"model.norm": "none", "opt.lr": 0.03}
    rows = chosen["arms"]["batchnorm"]["candidates"]
    assert [r["overrides"]["opt.lr"] for r in rows] == [0.01, 0.03, 0.1, 0.3, 1.0]
    for row in rows:  # every candidate's mean and interval over its seeds, as summarize gives
        expected = summarize(row["values"])
        assert row["n"] == 2 and row["mean"] == pytest.approx(expected.mean)
        assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))
    confirm = [r for r in ran[20:]]
    assert sorted(confirm) == [("batchnorm", 0.3, 10), ("batchnorm", 0.3, 11),
                               ("none", 0.03, 10), ("none", 0.03, 11)]  # fmt: skip
    assert {seed for *_, seed in ran[:20]} == {0, 1}
    index = json.loads((out / "sweep.json").read_text())
    assert len(index["trials"]) == 4 and (out / "selection" / "sweep.json").is_file()
    # Resumable: run again, nothing runs, the choice stands.
    again = sweep.run_sweep(_study(tmp_path), out, **kwargs)
    assert again == {"skipped": 24} and len(ran) == 24
    assert json.loads((out / "selection.json").read_text()) == chosen


def test_a_candidate_with_a_diverged_seed_is_not_chosen(tmp_path):
    out, ran = tmp_path / "out", []
    base = _runner(ran)

    def runner(cfg, run_dir):
        summary = base(cfg, run_dir)
        if cfg.opt.lr == 0.3 and cfg.train.seed == 1:  # BN's best lr diverges on one seed
            summary = {"status": "diverged", "test_accuracy": float("nan")}
            write_json(run_dir / "summary.json", summary)
        return summary

    sweep.run_sweep(_study(tmp_path), out, runner=runner, engine="sequential", log=print)
    chosen = json.loads((out / "selection.json").read_text())["arms"]["batchnorm"]
    assert chosen["chosen"]["opt.lr"] in (0.1, 1.0)
    assert not chosen["candidates"][3]["eligible"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "selects on the test split"),
        ({"validation": 0}, "hold no validation split"),
        ({"confirm_seeds": (1, 10)}, r"confirmation trials use seed\(s\) \[1\]"),
    ],
)
def test_a_study_that_could_read_test_for_a_choice_is_refused(tmp_path, kwargs, match):
    ran = []
    with pytest.raises(config.ConfigError, match=match):
        sweep.run_sweep(_study(tmp_path, **kwargs), tmp_path / "out", runner=_runner(ran))
    assert ran == [] and not (tmp_path / "out").exists()  # refused before anything ran


def test_the_cli_refuses_selecting_on_test_with_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", "sweep", str(_study(tmp_path, split="test")),
         "--workdir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "selects on the test split" in done.stderr and not (tmp_path / "out").exists()


def test_an_unfinished_selection_runs_no_confirmation(tmp_path):
    out, ran = tmp_path / "out", []
    kwargs = {"runner": _runner(ran), "engine": "sequential", "log": print}
    sweep.run_sweep(_study(tmp_path), out, shard_spec=(0, 2), **kwargs)
    assert not (out / "selection.json").exists() and not (out / "sweep.json").exists()
    assert all(seed in (0, 1) for *_, seed in ran)
    sweep.run_sweep(_study(tmp_path), out, shard_spec=(1, 2), **kwargs)
    assert (out / "selection.json").is_file()
    # The second shard chose, then ran its share of the confirmation; the first runs the rest.
    sweep.run_sweep(_study(tmp_path), out, shard_spec=(0, 2), **kwargs)
    confirmed = sorted(r for r in ran if r[2] >= 10)
    assert confirmed == [("batchnorm", 0.3, 10), ("batchnorm", 0.3, 11),
                         ("none", 0.03, 10), ("none", 0.03, 11)]  # fmt: skip


def test_selection_smoke_runs_both_phases_in_one_command(tmp_path, tfds_dir):
    """The acceptance check, on real MNIST: one `bnlab sweep --smoke` trains the selection and
    the confirmation trials."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", "sweep", str(_study(tmp_path, tfds_dir=tfds_dir)),
         "--workdir", str(out), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = json.loads((out / "selection.json").read_text())
    selection_seeds = set()
    for path in (out / "selection" / "runs").glob("*/config.json"):
        cfg = json.loads(path.read_text())
        selection_seeds.add(cfg["train"]["seed"])
        assert cfg["data"]["validation_size"] == 600
    confirm_seeds = {
        json.loads(p.read_text())["train"]["seed"] for p in (out / "runs").glob("*/config.json")
    }
    assert selection_seeds == {0, 1} and confirm_seeds == {10, 11}
    for arm, entry in chosen["arms"].items():
        assert entry["chosen"]["model.norm"] == arm
        means = [r["mean"] for r in entry["candidates"]]
        assert entry["candidates"][entry["chosen_index"]]["mean"] == max(means)
    summaries = [json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")]
    assert len(summaries) == 4 and all(s["test_accuracy"] > 0.3 for s in summaries)


def test_the_regularization_study_declares_its_selection():
    module = config.load_module(ROOT / "experiments/regularization.py")
    plan = selection.plan(module)
    assert plan.split == "validation" and len(plan.arms) == 8
    assert all(len(options) == 3 for options in plan.arms.values())
    trials, configs = sweep.trial_configs(module)
    assert len(trials) == 80 and {c.train.seed for c in configs.values()} == set(range(10, 15))


THREE_ARMS = """
def candidates(smoke=False):
    arms = {norm: [{"model.norm": norm, "opt.lr": lr} for lr in LRS]
            for norm in ("batchnorm", "none")}
    arms["none_clip"] = [{"model.norm": "none", "opt.clip": "adaptive", "opt.lr": lr}
                         for lr in LRS]
    return arms


def sweep(chosen, smoke=False):
    for arm in ("batchnorm", "none", "none_clip"):
        for seed in (10, 11, 12):
            yield {**chosen[arm], "train.seed": seed}


BASELINE = {"model.norm": "batchnorm", "opt.clip": "(default)"}
"""


def test_the_report_names_the_split_that_chose_and_compares_each_arm_at_its_choice(tmp_path):
    """Three arms, two of them without normalization (one with adaptive clipping): the learning
    rate is then a varying key of the table, and each arm is still compared with the baseline
    arm at its own chosen rate."""
    text = _study(tmp_path, confirm_seeds=(10, 11, 12)).read_text()
    text = text[: text.index("def candidates")] + THREE_ARMS
    path = tmp_path / "three.py"
    path.write_text(text)
    out = tmp_path / "out"
    sweep.run_sweep(path, out, runner=_runner([]), engine="sequential", log=print)
    from bnlab.studies import report
    from bnlab.studies.results import holm, load_sweep, verdict, welch

    text = report.write_report(out).read_text()
    assert "## Selection: chosen on the validation split" in text
    assert text.count("**chosen**") == 3
    section = text[text.index("## Selection") :]
    assert section.count("| batchnorm | lr=") == 5 and section.count("| none_clip | lr=") == 5
    loaded = load_sweep(out)
    assert "opt.lr" in loaded.varying  # not a follower of model.norm: two arms share "none"
    finals = {g.name: [t.final("accuracy") for t in g.trials] for g in loaded.groups}
    base = next(name for name in finals if "norm=batchnorm" in name)
    tests = {n: welch(v, finals[base]) for n, v in finals.items() if n != base}
    adjusted = dict(zip(tests, holm([c.p for c in tests.values()]), strict=True))
    for name, c in tests.items():
        norm, lr = name.split(", ")[0].split("=")[1], name.split("lr=")[1].split(",")[0]
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {norm} | {lr} |")
                  and ("adaptive" in line) == ("clip=adaptive" in name)]  # fmt: skip
        assert row.endswith(f"| {verdict(c, adjusted[name])} |"), row


SHARED_LR = """
def sweep(chosen, smoke=False):
    for arm in ("batchnorm", "none"):
        shared = {{"model.norm": arm, "opt.lr": {shared}}}
        for setting in [chosen[arm]] + [shared] * (chosen[arm] != shared):
            for seed in (10, 11, 12):
                yield {{**setting, "train.seed": seed}}

BASELINE = {{"model.norm": "none"}}
"""


@pytest.mark.parametrize("shared", [0.01, 0.03])
def test_a_setting_away_from_its_choice_is_compared_at_its_own_learning_rate(tmp_path, shared):
    """BN at its choice (0.3) against none at its own (0.03); BN at a shared learning rate
    against none at that rate, not against none's choice (0.01), or against none's choice
    where that is the shared rate (0.03)."""
    text = _study(tmp_path).read_text()
    path = tmp_path / "shared.py"
    path.write_text(text[: text.index("def sweep")] + SHARED_LR.format(shared=shared))
    out = tmp_path / "out"
    sweep.run_sweep(path, out, runner=_runner([]), engine="sequential", log=print)
    from bnlab.studies.compare import against_baseline
    from bnlab.studies.results import load_sweep

    loaded = load_sweep(out)
    pairs = {name: v.baseline for name, v in against_baseline(loaded, loaded.baseline).items()}
    assert pairs == {
        "norm=batchnorm, lr=0.3": "norm=none, lr=0.03",
        f"norm=batchnorm, lr={shared}": f"norm=none, lr={shared}",
    }

"""Reports: statistics over seeds (closed forms), report.md and figures of a small real sweep."""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from matplotlib import image

from bnlab import cli, results
from bnlab.studies import plots, report
from bnlab.training.writers import read_jsonl, write_json

EXPERIMENT = """
from bnlab.config import default_config


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.opt.name = "sgd"
    c.train.batch_size = 60
    c.train.epochs = 2
    c.data.train_size = 300
    c.data.tfds_dir = {tfds_dir!r}
    return c


def sweep():
    for norm in ("batchnorm", "none"):
        for lr in (0.1, 1e4):  # without BN, 1e4 diverges
            for seed in (0, 1):
                yield {{"model.norm": norm, "opt.lr": lr, "train.seed": seed}}
    for seed in (2, 3):  # seed 2 fails, seed 3 is interrupted (see _runner)
        yield {{"model.norm": "none", "opt.lr": 0.1, "train.seed": seed}}
"""


DRIVER = """
import sys
from bnlab.studies import sweep
from bnlab.training.run import run
from bnlab.training.writers import write_json


def runner(cfg, run_dir):
    if cfg.train.seed == 2:
        raise RuntimeError("boom: a broken trial")
    if cfg.train.seed == 3:  # killed after its config, before any result
        run_dir.mkdir(parents=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        return {"status": "interrupted"}
    return run(cfg, run_dir)


sweep.run_sweep(
    sys.argv[1], sys.argv[2], runner=runner, engine="sequential", log=lambda s: None
)
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tfds_dir):
    """A real 10-trial sweep (8 trained, 1 failed, 1 unfinished) and its report."""
    tmp = tmp_path_factory.mktemp("report")
    experiment = tmp / "exp.py"
    experiment.write_text(EXPERIMENT.format(tfds_dir=tfds_dir))
    # In a subprocess, with JAX's persistent compilation cache: trials that differ only in
    # seed (and evaluation programs that ignore the learning rate) compile once; 3x faster.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache")}
    cache |= {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cache |= {"JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(experiment), str(tmp / "out")],
        cwd=ROOT,
        env={**os.environ, **cache},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", report.write_report(tmp / "out")


def _summaries(directory, norm, lr):
    spec = json.loads((directory / "sweep.json").read_text())
    out = []
    for t in spec["trials"]:
        if t["overrides"]["model.norm"] == norm and float(t["overrides"]["opt.lr"]) == lr:
            path = directory / "runs" / t["trial_id"] / "summary.json"
            out.append(json.loads(path.read_text()) if path.exists() else {"status": "missing"})
    return out


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 1, math.tan(math.pi * 0.475)),  # Cauchy: tan(pi (p - 1/2))
        (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # (2p - 1) / sqrt(2p(1 - p))
        (0.9, 2, 0.8 / math.sqrt(2 * 0.9 * 0.1)),
        (0.975, 4, 2.776445105),  # tables
        (0.995, 10, 3.169272673),
        (0.975, 30, 2.042272456),
        (0.975, 1000, 1.962339081),
        (0.025, 4, -2.776445105),  # symmetry
    ],
)
def test_t_quantile(p, df, expected):
    assert results.t_quantile(p, df) == pytest.approx(expected, rel=1e-8)


def test_summarize_closed_forms():
    s = results.summarize([1.0, 2.0, 3.0])
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)  # t_0.975(2) * std / sqrt(n)
    assert s == pytest.approx((3, 2.0, 1.0, 2.0 - half, 2.0 + half))
    s = results.summarize([0.5, 0.7], level=0.9)  # t_0.95(1) = tan(0.45 pi)
    half = math.tan(0.45 * math.pi) * math.sqrt(0.02) / math.sqrt(2)
    assert s == pytest.approx((2, 0.6, math.sqrt(0.02), 0.6 - half, 0.6 + half))
    one, none = results.summarize([0.25]), results.summarize([])
    assert (one.n, one.mean) == (1, 0.25) and math.isnan(one.std) and math.isnan(one.low)
    assert none.n == 0 and math.isnan(none.mean)
    normal = statistics.NormalDist().inv_cdf(0.975)  # the large-df limit
    assert results.t_quantile(0.975, 10**7) == pytest.approx(normal, abs=1e-6)
    with pytest.raises(ValueError, match="integer df"):
        results.t_quantile(0.975, 0)


def test_figure_bands_skip_missing_values_without_warnings():
    # Columns: two values, one, none, two; the sample std, as the report's tables use.
    rows = np.array([[1.0, np.nan, np.nan, 2.0], [3.0, 5.0, np.nan, np.nan], [np.nan] * 3 + [4.0]])
    mean, std = plots._mean_std(rows)  # a RuntimeWarning would fail the test (pyproject)
    np.testing.assert_array_equal(mean, [2.0, 5.0, np.nan, 3.0])
    np.testing.assert_allclose(
        std, [statistics.stdev([1, 3]), 0.0, np.nan, statistics.stdev([2, 4])]
    )
    assert [a.shape for a in plots._mean_std(np.zeros((0, 2)))] == [(2,), (2,)]


def test_table_matches_the_summaries(swept):
    directory, path = swept
    loaded = report.load_sweep(directory)
    assert loaded.varying == ["model.norm", "opt.lr"]
    counts = loaded.counts()  # BN at lr 1e4 may diverge too
    assert (counts["failed"], counts["missing"], counts["ok"] + counts["diverged"]) == (1, 1, 8)
    text = path.read_text()
    rows = {(r["model.norm"], r["opt.lr"]): r for r in report.table(loaded)}
    assert len(rows) == 4
    for (norm, lr), row in rows.items():
        summaries = _summaries(directory, norm, lr)
        statuses = [s["status"] for s in summaries]
        assert row["seeds"] == len(summaries)
        assert [row[s] for s in results.STATUSES] == [statuses.count(s) for s in results.STATUSES]
        for metric in ("accuracy", "loss"):
            values = np.array([s[f"test_{metric}"] for s in summaries if s["status"] == "ok"])
            stats = row[metric]
            assert stats.n == len(values)
            if len(values) == 2:  # t_0.975(1) = 12.7062
                mean, std = values.mean(), values.std(ddof=1)
                half = 12.70620474 * std / math.sqrt(2)
                assert stats == pytest.approx((2, mean, std, mean - half, mean + half), rel=1e-6)
                assert f"{mean:.4f} ± {std:.4f}" in text
    diverged = rows[("none", 1e4)]
    assert diverged["diverged"] == 2 and diverged["accuracy"].n == 0
    mixed = rows[("none", 0.1)]
    assert (mixed["seeds"], mixed["ok"], mixed["failed"], mixed["missing"]) == (4, 2, 1, 1)


def test_report_names_the_trials_that_did_not_finish_ok(swept):
    directory, path = swept
    text = path.read_text()
    assert "# Sweep report: exp" in text and f"`bnlab sweep {directory.parent / 'exp.py'}`" in text
    assert "10 trials in 4 settings" in text and "(0, 1, 2, 3)" in text
    lines = {line for line in text.splitlines() if line.startswith("- `")}
    assert any("seed=2" in ln and "failed: RuntimeError: boom" in ln for ln in lines)
    assert any("seed=3" in ln and "missing (no summary.json)" in ln for ln in lines)
    assert sum("diverged, stopped at step" in ln for ln in lines) >= 2


def test_figures_are_pngs_linked_relative(swept):
    directory, path = swept
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", path.read_text())
    assert links == [
        "figures/accuracy_curves.png",
        "figures/accuracy_vs_lr.png",
        "figures/status_counts.png",
    ]
    for link in links:
        assert (directory / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.imread(directory / link).shape[0] > 200
    assert len(re.findall(r"^\*Figure \d\. .+\*$", path.read_text(), flags=re.M)) == 3


def test_activation_percentiles_figure_when_records_carry_them(swept, tmp_path):
    directory = shutil.copytree(swept[0], tmp_path / "copy")
    for metrics in directory.glob("runs/*/metrics.jsonl"):
        records = read_jsonl(metrics)
        for r in records:
            if r["split"] == "test":
                r.update(act_p15=-1.0 - r["step"], act_p50=0.0, act_p85=1.0 + r["step"])
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.write_report(directory).read_text()
    assert "figures/activation_percentiles.png" in text
    assert (directory / "figures/activation_percentiles.png").stat().st_size > 1000


def test_a_sweep_that_has_not_run_reports_every_trial_missing(tmp_path):
    trials = [{"trial_id": f"seed-{i}", "overrides": {"train.seed": str(i)}} for i in (0, 1)]
    write_json(tmp_path / "sweep.json", {"experiment": "x.py", "smoke": True, "trials": trials})
    text = report.write_report(tmp_path).read_text()
    assert "0 ok, 0 diverged, 0 failed, 2 missing" in text and "no ok seed" in text
    assert "figures/status_counts.png" in text


def test_cli_report_exit_codes(swept, tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "has no sweep.json" in capsys.readouterr().err
    assert cli.main(["report", str(swept[0])]) == 0
    assert capsys.readouterr().out.strip() == str(swept[1])


def _fake_sweep(directory, grid):
    """A sweep folder with summaries only (no training): every trial ok, the first diverged."""
    trials = []
    for i, overrides in enumerate(grid):
        tid = f"trial-{i}"
        trials.append({"trial_id": tid, "overrides": overrides})
        (directory / "runs" / tid).mkdir(parents=True)
        summary = {"status": "diverged" if i == 0 else "ok", "test_accuracy": 0.9 + i / 1000}
        write_json(directory / "runs" / tid / "summary.json", {**summary, "test_loss": 0.1})
    write_json(directory / "sweep.json", {"experiment": "x.py", "smoke": False, "trials": trials})


@pytest.mark.parametrize(
    "keys, figure",
    [
        ({"opt.schedule": ("constant", "cosine"), "opt.clip": ("none", "global_norm")},
         "schedule_clip"),
        ({"opt.name": ("sgd", "adam", "rmsprop")}, "optimizers"),
    ],
)  # fmt: skip
def test_comparison_bars_only_when_the_sweep_varies_their_keys(tmp_path, keys, figure):
    grid = [{"model.norm": "'none'"}, {"model.norm": "'batchnorm'"}]
    for key, values in keys.items():
        grid = [{**point, key: repr(v)} for point in grid for v in values]
    grid = [{**point, "train.seed": repr(s)} for point in grid for s in (0, 1)]
    _fake_sweep(tmp_path, grid)
    text = report.write_report(tmp_path).read_text()
    links = re.findall(r"\(figures/(\w+)\.png\)", text)
    assert links == [figure, "status_counts"]
    assert image.imread(tmp_path / "figures" / f"{figure}.png").shape[0] > 200


def _written_sweep(directory, trials):
    """A sweep folder written by hand: `trials` is a list of (overrides, summary, records)."""
    from bnlab.studies import sweep as sweep_lib

    specs = []
    for overrides, summary, records in trials:
        tid = sweep_lib.trial_id(overrides)
        run_dir = directory / "runs" / tid
        run_dir.mkdir(parents=True)
        write_json(run_dir / "summary.json", summary)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        specs.append({"trial_id": tid, "overrides": {k: str(v) for k, v in overrides.items()}})
    write_json(directory / "sweep.json", {"experiment": "x.py", "smoke": False, "trials": specs})


def test_diagnostics_validation_and_early_stopped_trials_in_a_report(tmp_path):
    def diag(step, seed, norm_scale):
        return {
            "step": step,
            "split": "diag",
            "ics/dense1/l2": 0.1 * (seed + 1) + step,
            "hessian/lambda_max": 5.0 + step,
            "hessian/density_nodes": [[-1.0, 0.0, 20.0], [-1.0, 0.5, 19.0]],
            "hessian/density_weights": [[0.3, 0.6, 0.1], [0.2, 0.7, 0.1]],
            **{
                f"init_gradients/{norm}/depth{d}": [scale * 2.0**d] + [1.0] * (d - 1)
                for norm, scale in (("batchnorm", norm_scale), ("none", 1.0))
                for d in (2, 3)
            },
        }

    trials = []
    for lr in (0.1, 0.2):
        for seed, status in ((0, "ok"), (1, "early_stopped")):
            summary = {"status": status, "test_accuracy": 0.9 + seed * 0.01 + lr / 10}
            summary |= {"test_loss": 0.3, "validation_accuracy": 0.8 + seed * 0.02, "steps": 10}
            summary |= {"epochs": 1, "best_epoch": 0}
            records = [diag(0, seed, 1.0 + seed), diag(10, seed, 1.0 + seed)]
            records += [{"step": 10, "split": "validation", "accuracy": 0.8, "loss": 0.5}]
            trials.append(({"opt.lr": lr, "train.seed": seed}, summary, records))
    _written_sweep(tmp_path, trials)
    sweep = results.load_sweep(tmp_path)
    row = report.table(sweep)[0]
    assert row["ok"] == 1 and row["early_stopped"] == 1
    assert row["accuracy"].n == 2  # an early-stopped trial has a result
    assert row["validation_accuracy"].mean == pytest.approx(0.81)
    text = report.write_report(tmp_path).read_text()
    assert "validation accuracy, mean ± std" in text and "stopped early after epoch 1" in text
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"diag_ics.png", "diag_hessian.png", "diag_hessian_density.png"} <= names
    assert "diag_init_gradients.png" in names
    from bnlab.studies import diag_plots

    depths, rows = diag_plots.first_layer_norms(sweep.groups[0])["batchnorm"]
    np.testing.assert_array_equal(depths, [2, 3])
    np.testing.assert_allclose(rows, [[4.0, 8.0], [8.0, 16.0]])  # seeds 0 and 1, 2**d scale
    grid, density = diag_plots._density(sweep.groups[0], 0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, rel=1e-3)  # a density
    assert grid[np.argmax(density)] == pytest.approx(0.25, abs=0.5)  # the bulk, not the outlier


def test_keys_that_another_key_determines_are_named_once(tmp_path):
    cnn = {"model.name": "'cnn'", "opt.lr": "0.1", "train.epochs": "10"}
    grid = [
        {**model, "model.dropout": repr(rate), "train.seed": repr(seed)}
        for model in ({"model.name": "'mlp'"}, cnn)
        for rate in (0.0, 0.5)
        for seed in (0, 1)
    ]
    _fake_sweep(tmp_path, grid)
    sweep = results.load_sweep(tmp_path)
    assert sweep.varying == ["model.name", "model.dropout"]  # names first without an order
    assert sweep.follows == {"opt.lr": "model.name", "train.epochs": "model.name"}
    assert len(sweep.groups) == 4  # the same settings as with every key
    text = report.write_report(tmp_path).read_text()
    assert "- `opt.lr` follows `model.name`: mlp -> (default), cnn -> 0.1" in text
    assert "| `model.name` | `model.dropout` | seeds |" in text


def test_accuracy_vs_batch_fits_the_axis_unless_a_marker_for_divergence_needs_zero(tmp_path):
    grid = [
        {"model.norm": repr(norm), "train.batch_size": b, "train.seed": s}
        for norm in ("none", "batchnorm")
        for b in (2, 128)
        for s in (0, 1)
    ]
    trials = []
    for i, overrides in enumerate(grid):
        summary = {"status": "ok", "test_accuracy": 0.97 + i / 1000, "test_loss": 0.1}
        trials.append((overrides, summary, []))
    _written_sweep(tmp_path / "ok", trials)
    (ax,) = plots.accuracy_vs_batch(results.load_sweep(tmp_path / "ok")).axes
    low, high = ax.get_ylim()
    assert 0.96 < low < 0.97 and 0.977 < high < 0.99  # the means are 0.9705-0.9765
    trials[0][1]["status"] = "diverged"
    _written_sweep(tmp_path / "diverged", trials)
    (ax,) = plots.accuracy_vs_batch(results.load_sweep(tmp_path / "diverged")).axes
    assert ax.get_ylim() == (-0.1, 1.02)


def test_a_key_only_one_normalization_sets_is_a_series_not_a_panel(tmp_path):
    trials = [
        ({"model.norm": "'batchnorm'", "train.batch_size": b, "train.seed": 0}, {}, [])
        for b in (2, 128)
    ]
    trials += [
        (
            {"model.norm": "'ghost_batchnorm'", "train.batch_size": 128,
             "norm.virtual_batch_size": v, "train.seed": 0},
            {}, [],
        )
        for v in (2, 32)
    ]  # fmt: skip
    for i, (_, summary, _) in enumerate(trials):
        summary.update(status="ok", test_accuracy=0.9 + i / 100, test_loss=0.1)
    _written_sweep(tmp_path, trials)
    sweep = results.load_sweep(tmp_path)
    assert plots._norm_only_keys(sweep) == ("norm.virtual_batch_size",)
    (ax,) = plots.accuracy_vs_batch(sweep).axes  # one panel, not one per virtual batch
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "norm=batchnorm",
        "norm=ghost_batchnorm, virtual_batch_size=2",
        "norm=ghost_batchnorm, virtual_batch_size=32",
    ]


def test_a_declared_baseline_adds_welch_differences_holm_adjusted(tmp_path):
    from bnlab import results

    accuracies = {
        ("none", 0.1): [0.970, 0.972, 0.968],
        ("batchnorm", 0.1): [0.981, 0.983, 0.982],
        ("none", 1.0): [0.950, 0.960, 0.955],
        ("batchnorm", 1.0): [0.956, 0.951, 0.962],
    }
    trials = [
        (
            {"model.norm": norm, "opt.lr": lr, "train.seed": seed},
            {"status": "ok", "test_accuracy": acc, "test_loss": 0.1, "steps": 10},
            [],
        )
        for (norm, lr), values in accuracies.items()
        for seed, acc in enumerate(values)
    ]
    _written_sweep(tmp_path, trials)
    experiment = tmp_path / "x.py"
    experiment.write_text('BASELINE = {"model.norm": "none"}\n')
    spec = json.loads((tmp_path / "sweep.json").read_text())
    write_json(tmp_path / "sweep.json", {**spec, "experiment": str(experiment)})
    text = report.write_report(tmp_path).read_text()
    bn = [
        results.welch(accuracies[("batchnorm", lr)], accuracies[("none", lr)]) for lr in (0.1, 1.0)
    ]
    p = results.holm([c.p for c in bn])
    rows = [line for line in text.splitlines() if line.startswith("| batchnorm")]
    assert len(rows) == 2
    for row, c, adjusted in zip(rows, bn, p, strict=True):
        assert row.endswith(f"| {results.verdict(c, adjusted)} |"), row
    assert p[0] < 0.05 <= p[1]  # at lr 0.1 BN wins; at lr 1.0 the arms are indistinguishable
    assert "indistinguishable" in rows[1] and "indistinguishable" not in rows[0]
    assert sum(line.endswith("| baseline |") for line in text.splitlines()) == 2


def test_a_study_folder_rebuilds_the_report_from_its_compact_data_alone(swept, tmp_path):
    """`bnlab report DIR --data OUT`: OUT/study.json holds what the report reads; a copy of
    OUT alone rebuilds the same report.md, byte for byte, and one changed number shows."""
    directory, path = swept
    assert cli.main(["report", str(directory), "--data", str(tmp_path / "study")]) == 0
    study = tmp_path / "study"
    assert (study / "report.md").read_text() == path.read_text()  # as from the sweep folder
    assert (study / "study.json").stat().st_size < 200_000
    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("report.md", "figures"))
    assert cli.main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_bytes() == (study / "report.md").read_bytes()
    assert {p.name for p in (copy / "figures").iterdir()} == {
        p.name for p in (study / "figures").iterdir()
    }
    data = json.loads((copy / "study.json").read_text())
    ok = next(t for t in data["trials"] if t["status"] == "ok")
    ok["summary"]["test_accuracy"] -= 0.001  # one number of one trial
    (copy / "study.json").write_text(json.dumps(data))
    assert cli.main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_bytes() != (study / "report.md").read_bytes()


def test_a_run_that_reports_its_best_epoch_is_read_at_that_epoch():
    summary = {"status": "early_stopped", "test_accuracy": 0.90, "best_test_accuracy": 0.95}
    summary |= {"validation_accuracy": 0.89, "best_validation_accuracy": 0.96, "best_epoch": 3}
    last = results.TrialResult("t", {}, "early_stopped", summary, {}, [])
    best = results.TrialResult("t", {}, "early_stopped", {**summary, "reported": "best"}, {}, [])
    assert (last.final("accuracy"), last.final("accuracy", "validation")) == (0.90, 0.89)
    assert (best.final("accuracy"), best.final("accuracy", "validation")) == (0.95, 0.96)
    from bnlab.training.records import result_line

    summary |= {"best_test_loss": 0.2, "test_loss": 0.3, "steps": 50}
    line = result_line({**summary, "reported": "best"}, "w")
    assert "test_accuracy=0.9500" in line and "epoch 4, the best validation epoch" in line
    assert "last epoch: test_accuracy=0.9000" in line
    assert result_line(summary, "w").startswith("status=early_stopped test_accuracy=0.9000 ")


def test_a_setting_without_a_baseline_counterpart_says_so(tmp_path):
    trials = [
        (
            {"model.norm": norm, "opt.lr": lr, "train.seed": seed},
            {"status": "ok", "test_accuracy": 0.9 + 0.01 * seed, "test_loss": 0.1, "steps": 10},
            [],
        )
        for norm, lr in (("none", 0.1), ("batchnorm", 0.1), ("batchnorm", 1.0))
        for seed in (0, 1)
    ]
    _written_sweep(tmp_path, trials)
    experiment = tmp_path / "x.py"
    experiment.write_text('BASELINE = {"model.norm": "none"}\n')
    spec = json.loads((tmp_path / "sweep.json").read_text())
    write_json(tmp_path / "sweep.json", {**spec, "experiment": str(experiment)})
    rows = [line for line in report.write_report(tmp_path).read_text().splitlines()
            if line.startswith(("| none", "| batchnorm"))]  # fmt: skip
    assert rows[0].endswith("| baseline |")
    assert "indistinguishable" in rows[1]  # BN at lr 0.1 against none at lr 0.1
    assert rows[2].endswith("| no baseline setting to compare with |")  # no none at lr 1.0


def test_recalibrated_accuracy_is_a_column_when_trials_were_recalibrated(tmp_path):
    trials = [
        (
            {"norm.momentum": m, "train.seed": seed},
            {"status": "ok", "test_accuracy": acc, "test_loss": 0.1, "steps": 10},
            [],
        )
        for m, accs in ((0.9, (0.96, 0.97)), (0.999, (0.90, 0.92)))
        for seed, acc in enumerate(accs)
    ]
    _written_sweep(tmp_path, trials)
    text = report.write_report(tmp_path).read_text()
    assert "recalibrated" not in text  # none recalibrated: no column
    spec = json.loads((tmp_path / "sweep.json").read_text())
    for t, recal in zip(spec["trials"], (0.965, 0.975, 0.963, 0.971), strict=True):
        evaluation = {"step": 10, "accuracy": 0.0, "loss": 0.0}
        evaluation["recalibrated"] = {"examples": 100, "accuracy": recal, "loss": 0.1}
        write_json(tmp_path / "runs" / t["trial_id"] / "evaluate.json", evaluation)
    text = report.write_report(tmp_path).read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 0.9 |", "| 0.999 |"))]
    assert "test accuracy, recalibrated statistics" in text
    assert "| 0.9700 ± 0.0071 |" in rows[0] and "| 0.9670 ± 0.0057 |" in rows[1]
    data = tmp_path / "data"
    report.write_report(tmp_path, data)  # the compact data keeps it
    assert (data / "report.md").read_text() == text

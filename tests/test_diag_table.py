"""A report's diagnostics tables (`DIAG_TABLE`): values at the first and last measurement per
setting, and the last one's Welch test against the baseline, from a study folder written by
hand; kept in the committed data."""

import json

import numpy as np
import pytest
from scipy import stats

from bnlab.studies import diag_table, report, study_data
from bnlab.studies.results import load_sweep

RANKS = {
    "batchnorm": ([30.0, 31.0, 29.5], [40.0, 41.0, 43.0]),
    "none": ([2.0, 2.5, 1.5], [5, 6, 4]),
}


def _trial(norm, seed, first, last):
    overrides = {"model.norm": norm, "train.seed": str(seed)}
    return {
        "trial_id": f"{norm}-{seed}",
        "overrides": overrides,
        "status": "ok",
        "summary": {"status": "ok", "test_accuracy": 0.9, "test_loss": 0.3},
        "config": {},
        "records": {
            "test": [{"split": "test", "step": 10, "accuracy": 0.9, "loss": 0.3}],
            "diag": [
                {"split": "diag", "step": 0, "rank/block0": first, "rank/head": 1.0},
                {"split": "diag", "step": 10, "rank/block0": last, "other/x": 3.0},
            ],
        },
    }


@pytest.fixture
def study(tmp_path):
    trials = [
        _trial(norm, seed, RANKS[norm][0][seed], RANKS[norm][1][seed])
        for norm in RANKS
        for seed in range(3)
    ]
    data = {
        "format": study_data.FORMAT,
        "experiment": "experiments/made_up.py",
        "smoke": False,
        "overrides": {},
        "keys": ["model.norm", "train.seed"],
        "doc": "A made-up study.",
        "baseline": {"model.norm": "none"},
        "selection": None,
        "diag_table": ["rank/block*", "rank/missing"],
        "trials": trials,
    }
    (tmp_path / study_data.STUDY_FILE).write_text(json.dumps(data))
    return tmp_path


def test_first_and_last_values_and_the_welch_test_against_the_baseline(study):
    sweep = load_sweep(study)
    assert diag_table.keys(sweep) == ["rank/block0"]  # patterns: rank/head is not named
    text = "\n".join(diag_table.section(sweep))
    bn_first, bn_last = RANKS["batchnorm"]
    row = next(line for line in text.splitlines() if line.startswith("| batchnorm"))
    assert f"{np.mean(bn_first):.4g} ± {np.std(bn_first, ddof=1):.4g}" in row
    assert f"{np.mean(bn_last):.4g} ± {np.std(bn_last, ddof=1):.4g}" in row
    p = stats.ttest_ind(bn_last, RANKS["none"][1], equal_var=False).pvalue
    diff = np.mean(bn_last) - np.mean(RANKS["none"][1])
    assert (
        f"| {diff:+.4g} [" in row and f"p={p:.2g} |" in row
    )  # significant: no "indistinguishable"
    assert "| none | " in text and "baseline |" in text
    assert "step 0 | step 10" in text


def test_the_report_carries_it_and_the_committed_data_keeps_the_patterns(study, tmp_path):
    path = report.write_report(study)
    assert "## Diagnostics" in path.read_text() and "### `rank/block0`" in path.read_text()
    copy = tmp_path / "copy"
    study_data.write(load_sweep(study), copy)
    assert load_sweep(copy).diag_table == ["rank/block*", "rank/missing"]


def test_without_diag_table_nothing_is_added(study):
    data = json.loads((study / study_data.STUDY_FILE).read_text())
    del data["diag_table"]
    (study / study_data.STUDY_FILE).write_text(json.dumps(data))
    assert diag_table.section(load_sweep(study)) == []
    assert "## Diagnostics" not in report.write_report(study).read_text()


def test_values_at_matched_loss(study):
    # Losses: BN falls to 0.2 at step 10; none stays at 0.5: the matched level is 0.5, which
    # BN reaches at step 0 already (it starts there) and none at step 10.
    data = json.loads((study / study_data.STUDY_FILE).read_text())
    for t in data["trials"]:
        first, last = t["records"]["diag"]
        bn = t["overrides"]["model.norm"] == "batchnorm"
        first["hessian/loss"], last["hessian/loss"] = (0.5, 0.2) if bn else (0.9, 0.5)
    data["diag_match"] = "hessian/loss"
    (study / study_data.STUDY_FILE).write_text(json.dumps(data))
    sweep = load_sweep(study)
    assert diag_table.match_target(sweep, "hessian/loss") == 0.5
    text = "\n".join(diag_table.section(sweep))
    assert "at matched `hessian/loss`" in text
    row = next(line for line in text.splitlines() if line.startswith("| batchnorm"))
    bn_first = RANKS["batchnorm"][0]  # BN's value at matched loss is its step-0 value
    assert row.count(f"{np.mean(bn_first):.4g} ± {np.std(bn_first, ddof=1):.4g}") == 2
    steps = text.split("### Steps at matched")[1]
    assert "| batchnorm | 0, 0, 0 |" in steps and "| none | 10, 10, 10 |" in steps

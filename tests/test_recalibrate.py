"""Recalibration: running statistics re-estimated from data equal the exact moments of each
normalization layer's inputs; `bnlab evaluate --recalibrate N` records both accuracies."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from bnlab import cli, data
from bnlab.nn.recalibrate import call_order, recalibrate
from bnlab.training import run
from bnlab.training.step import build_model

MLP = "experiments/bn_paper_mlp.py"
CNN = "experiments/mnist_cnn.py"


def _layer_inputs(model, variables, images):
    """Every module's `__call__` input, the model in evaluation mode, over all of `images`."""
    captured = {}

    def record(next_fun, args, kwargs, context):
        captured.setdefault(tuple(context.module.path), args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    return captured


@pytest.mark.parametrize("path", [MLP, CNN])
def test_recalibrated_statistics_are_the_exact_moments_of_each_layers_inputs(make_config, path):
    cfg = make_config(path, **{"data.train_size": 600})
    model = build_model(cfg)
    images = data.to_float(data.load(cfg.data, "train").images[:600])
    variables = model.init(jax.random.key(0), images[:2], train=False)
    # Statistics far from the data's (as a short run's lagging averages are).
    stale = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    variables = {**variables, "batch_stats": stale}
    new = recalibrate(model, variables, images, batch_size=200)
    order = call_order(model, variables, images[:1])
    assert len(order) == 3  # every BN layer (3 hidden layers; 2 conv blocks and the dense)
    inputs = _layer_inputs(model, {**variables, "batch_stats": new}, images)
    for owner in order:
        x = np.asarray(inputs[owner], np.float64).reshape(-1, inputs[owner].shape[-1])
        stats = new
        for part in owner:
            stats = stats[part]
        np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-4, atol=1e-6)
    assert jax.tree.structure(new) == jax.tree.structure(stale)
    # Pure: the weights are untouched, the input's statistics are not changed in place.
    assert jax.tree.all(jax.tree.map(np.array_equal, stale, variables["batch_stats"]))


def test_recalibration_needs_running_statistics_and_whole_chunks(make_config):
    cfg = make_config(MLP, **{"model.norm": "layernorm"})
    model = build_model(cfg)
    x = np.zeros((10, 28, 28, 1), np.float32)
    variables = model.init(jax.random.key(0), x[:2], train=False)
    with pytest.raises(ValueError, match="no running statistics"):
        recalibrate(model, variables, x, batch_size=5)
    cfg = make_config(MLP)
    model = build_model(cfg)
    variables = model.init(jax.random.key(0), x[:2], train=False)
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        recalibrate(model, variables, x, batch_size=4)


def test_evaluate_recalibrate_records_both_accuracies(make_config, tmp_path, capsys):
    # A short run with a slow moving average: its running statistics lag the weights.
    cfg = make_config(MLP, **{"data.train_size": 600, "train.epochs": 1, "norm.momentum": 0.999})
    summary = run.run(cfg, tmp_path / "run")
    assert cli.main(["evaluate", str(tmp_path / "run"), "--recalibrate", "600"]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((tmp_path / "run" / "evaluate.json").read_text())
    assert recorded["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    again = recorded["recalibrated"]
    assert (
        again["examples"] == 600
        and f"recalibrated(600): test_accuracy={again['accuracy']:.4f}" in out
    )
    # 10 steps at momentum 0.999 leave the statistics near 0/1: re-estimated, the test accuracy
    # moves a long way.
    assert abs(again["accuracy"] - recorded["accuracy"]) > 0.05
    assert cli.main(["evaluate", str(tmp_path / "run"), "--recalibrate", "60000"]) == 2
    assert "give 1 to 600 training examples" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        cli.main(["evaluate", str(tmp_path / "run"), "--recalibrate", "0"])

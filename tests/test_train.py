"""Training: the scanned epoch equals step-by-step training, no retracing, real MNIST learning."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnlab import config, data
from bnlab.training import train
from bnlab.training.records import diverged
from bnlab.training.run import run

MLP = "experiments/bn_paper_mlp.py"


def _setup(make_config, **overrides):
    cfg = make_config(MLP, **{"data.train_size": 600, **overrides})
    train_set = data.load(cfg.data, "train")
    programs = train.make_programs(cfg, train_set.size)
    init_key, data_key = train.run_keys(cfg.train.seed)
    state = programs.init(init_key, data.to_float(train_set.images[:60]))
    return cfg, train_set, programs, state, data_key


def test_scanned_epoch_equals_step_loop(make_config):
    cfg, ds, programs, state, key = _setup(make_config)
    step = jax.jit(
        functools.partial(
            train.train_step, model=programs.model, tx=programs.tx, schedule=programs.schedule
        )
    )
    looped = state
    for idx in train.epoch_batches(key, ds.size, cfg.train.batch_size):
        looped, _ = step(looped, (data.to_float(ds.images[idx]), ds.labels[idx]))
    scanned, metrics = programs.train_epoch(state, ds.images, ds.labels, key)
    assert metrics["loss"].shape == (programs.steps_per_epoch,)
    assert int(scanned.step) == int(looped.step) == 10
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), scanned, looped
    )


def test_train_step_and_epoch_compile_once(make_config):
    cfg, ds, programs, state, key = _setup(make_config)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return train.train_step(
            state, batch, model=programs.model, tx=programs.tx, schedule=programs.schedule
        )

    batch = (data.to_float(ds.images[:60]), ds.labels[:60])
    state, _ = step(state, batch)
    state, _ = step(state, batch)  # a retrace would raise
    step_fn = functools.partial(
        train.train_step, model=programs.model, tx=programs.tx, schedule=programs.schedule
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def epoch(state, images, labels, key):
        return train.train_epoch(
            state, images, labels, key, batch_size=cfg.train.batch_size, step_fn=step_fn
        )

    state, _ = epoch(state, ds.images, ds.labels, key)
    state, _ = epoch(state, ds.images, ds.labels, jax.random.fold_in(key, 1))


def test_evaluate_is_independent_of_eval_batch_size(make_config):
    cfg, ds, programs, state, key = _setup(make_config)
    state, _ = programs.train_epoch(state, ds.images, ds.labels, key)
    test = data.load(cfg.data, "test")
    images, labels = test.images[:1000], test.labels[:1000]
    whole = train.evaluate(
        state.params, state.batch_stats, images, labels, model=programs.model, batch_size=1000
    )
    ragged = train.evaluate(
        state.params, state.batch_stats, images, labels, model=programs.model, batch_size=300
    )
    np.testing.assert_allclose(ragged["accuracy"], whole["accuracy"])
    np.testing.assert_allclose(ragged["loss"], whole["loss"], rtol=1e-5)


def test_evaluation_leaves_batch_stats_untouched(make_config):
    cfg, ds, programs, state, key = _setup(make_config)
    state, _ = programs.train_epoch(state, ds.images, ds.labels, key)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = data.to_float(ds.images[:100])
    # What evaluation runs, with the statistics mutable: it must hand them back unchanged.
    _, evaluated = programs.model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, evaluated["batch_stats"], state.batch_stats)
    # The same call in training mode moves them, so the assertion above can fail.
    _, trained = programs.model.apply(variables, x, train=True, mutable=["batch_stats"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), trained, evaluated)
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("norm, low, high", [("batchnorm", 0.75, 1.0), ("none", 0.0, 0.5)])
def test_paper_mlp_learns_real_mnist_only_with_bn(make_config, tmp_path, norm, low, high):
    """200 steps (one epoch of 12,000 real examples, batch 60, lr 0.5), small Gaussian init.

    Measured on this config: BN 0.835 test accuracy, no BN 0.096 (the sigmoid MLP has not
    started to learn): the early-training gap of Ioffe & Szegedy's Fig. 1.
    """
    cfg = make_config(MLP, **{"model.norm": norm, "data.train_size": 12000, "train.epochs": 1})
    summary = run(cfg, tmp_path / norm)
    assert summary["status"] == "ok"
    assert low <= summary["test_accuracy"] <= high
    records = [json.loads(line) for line in (tmp_path / norm / "metrics.jsonl").open()]
    assert {r["split"] for r in records} == {"train", "test"}
    assert {"step", "loss", "accuracy", "grad_norm", "lr"} <= set(records[0])


def test_nonfinite_loss_marks_run_diverged(make_config, tmp_path):
    cfg = make_config(
        MLP,
        **{
            "model.norm": "none",
            "model.activation": "relu",
            "opt.lr": 1e4,
            "data.train_size": 600,
            "train.epochs": 3,
        },
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "diverged"
    assert summary["epochs"] == 1  # stopped at the first epoch with a non-finite loss
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def _diverged(train_losses, test_loss, grad_norm=None, bound=1e4):
    train = {"loss": train_losses}
    if grad_norm is not None:
        train["grad_norm"] = grad_norm
    return diverged(train, {"test": {"loss": test_loss}}, bound)


def test_divergence_is_seen_in_train_or_test_loss():
    assert not _diverged(np.array([1.0, 0.5]), 0.3)
    assert _diverged(np.array([1.0, np.nan]), 0.3)
    assert _diverged(np.array([1.0, 0.5]), float("nan"))  # NaN made by the last step's update
    assert _diverged(np.array([np.inf]), 0.3)


def test_divergence_is_any_nonfinite_train_metric_or_a_loss_above_the_bound():
    # A loss of 3e24 with a non-finite gradient norm once ended with status "ok".
    assert _diverged(np.array([1.0, 0.5]), 0.3, grad_norm=np.array([1.0, np.inf]))
    assert _diverged(np.array([1.0, 3e24]), 0.3)
    assert _diverged(np.array([1.0, 0.5]), 2e4)
    assert not _diverged(np.array([1.0, 9e3]), 0.3, grad_norm=np.array([1.0, 1e30]))
    assert _diverged(np.array([1.0, 20.0]), 0.3, bound=10.0)


def test_logged_lr_and_grad_norm_are_the_real_values(make_config):
    cfg, ds, programs, state, key = _setup(make_config, **{"opt.schedule": "cosine"})
    idx = train.epoch_batches(key, ds.size, cfg.train.batch_size)[0]
    images, labels = data.to_float(ds.images[idx]), ds.labels[idx]

    def loss(params):
        logits, _ = programs.model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return train.cross_entropy(logits, labels)

    first_grad_norm = optax.tree.norm(jax.grad(loss)(state.params))
    _, metrics = programs.train_epoch(state, ds.images, ds.labels, key)
    steps = np.arange(programs.steps_per_epoch)
    np.testing.assert_allclose(metrics["lr"], [programs.schedule(s) for s in steps], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"][0], first_grad_norm, rtol=1e-5)


def test_same_seed_same_run_other_data_key_other_run(make_config):
    cfg, ds, programs, state, key = _setup(make_config)
    copy = jax.tree.map(jnp.copy, state)
    _, a = programs.train_epoch(jax.tree.map(jnp.copy, state), ds.images, ds.labels, key)
    _, b = programs.train_epoch(copy, ds.images, ds.labels, key)
    np.testing.assert_array_equal(a["loss"], b["loss"])
    other = jax.random.fold_in(key, 7)
    _, c = programs.train_epoch(state, ds.images, ds.labels, other)
    assert not np.array_equal(a["loss"], c["loss"])


def test_epoch_batches_are_a_fresh_permutation_each_epoch():
    key = jax.random.key(0)
    first = np.asarray(train.epoch_batches(jax.random.fold_in(key, 0), 1000, 64))
    second = np.asarray(train.epoch_batches(jax.random.fold_in(key, 1), 1000, 64))
    assert first.shape == (15, 64)
    assert len(np.unique(first)) == first.size  # each example at most once
    assert not np.array_equal(first, second)


def test_epoch_in_chunks_equals_whole_epoch(make_config):
    cfg, ds, programs, state, key = _setup(make_config)
    whole, whole_metrics = programs.train_epoch(
        jax.tree.map(jnp.copy, state), ds.images, ds.labels, key
    )
    chunked, parts = state, []
    for start, steps in [(0, 3), (3, 4), (7, 3)]:
        chunked, metrics = programs.train_epoch(
            chunked, ds.images, ds.labels, key, start, steps=steps
        )
        parts.append(metrics["loss"])
    assert int(chunked.step) == int(whole.step) == 10
    np.testing.assert_array_equal(np.concatenate(parts), whole_metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)


def test_probe_percentiles_cover_the_whole_split(make_config):
    cfg = make_config(MLP, **{"data.train_size": 600, "train.probe_unit": 7})
    test_set = data.load(cfg.data, "test")
    programs = train.make_programs(cfg, 600)
    state = programs.init(train.run_keys(0)[0], data.to_float(test_set.images[:60]))
    # 3000 does not divide 10,000: the padded rows of the last batch must not count
    evaluate = functools.partial(
        train.evaluate,
        state.params,
        state.batch_stats,
        test_set.images,
        test_set.labels,
        model=programs.model,
        batch_size=3000,
    )
    got = evaluate(probe_unit=7)
    _, inter = programs.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        data.to_float(test_set.images),
        train=False,
        mutable=["intermediates"],
    )
    x = np.asarray(inter["intermediates"]["block2"]["act_input"][0])[:, 7]
    want = np.percentile(x, train.PROBE_PERCENTILES)
    np.testing.assert_allclose([got[f"act_p{q}"] for q in (15, 50, 85)], want, rtol=1e-5)
    with pytest.raises(config.ConfigError, match="probe_unit=100"):
        evaluate(probe_unit=100)


def test_the_slow_cpu_convolution_is_named_before_anything_runs(tmp_path, monkeypatch):
    from conftest import ROOT

    from bnlab.data.idx import DataError
    from bnlab.training import batched
    from bnlab.training import run as run_lib

    cnn = config.load_config(ROOT / "experiments" / "mnist_cnn.py")
    assert run_lib.speed_traps(config.validate(cnn), "cpu") == []
    xla = config.apply_overrides(
        cnn, {"model.conv_impl": "xla", "data.mnist_dir": str(tmp_path / "no_mnist")}
    )
    xla = config.validate(xla)
    (trap,) = run_lib.speed_traps(xla, "cpu")
    assert "--config.model.conv_impl=im2col" in trap
    assert run_lib.speed_traps(xla, "gpu") == []
    # `bnlab train` and the vmapped sweep engine warn before they load anything (here: data
    # that is not there), on CPU (as this test pretends to be on any machine).
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    for start in (
        lambda: run(xla, tmp_path / "run"),
        lambda: batched.run_group([xla], [tmp_path / "t"]),
    ):
        no_data = pytest.raises(DataError, match="does not exist")
        with pytest.warns(UserWarning, match="conv_impl='xla' on CPU"), no_data:
            start()
    assert not (tmp_path / "run").exists()

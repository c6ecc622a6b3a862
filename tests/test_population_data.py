"""`population_batchnorm_data`: population BN whose statistics are the data's, recomputed with
the current weights every K steps (`NormSpec.refresh`, `bnlab.training.step.stats_refresh`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnlab import config, norms
from bnlab.nn import recalibrate
from bnlab.training import train

N, EVERY, BATCH = 60, 2, 20


def _cfg(**overrides):
    overrides = {
        "model.name": "mlp",
        "model.norm": "population_batchnorm_data",
        "model.activation": "relu",
        "model.init": "he_normal",
        "norm.refresh_every": str(EVERY),
        "norm.refresh_examples": str(N),
        "train.batch_size": str(BATCH),
        **overrides,
    }
    return config.validate(config.apply_overrides(config.default_config(), overrides))


def _setup(cfg):
    model = train.build_model(cfg)
    tx = optax.sgd(0.5)
    images = jax.random.randint(jax.random.key(1), (120, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.key(2), (120,), 0, 10)
    state = train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    step_fn = functools.partial(
        train.train_step, model=model, tx=tx, schedule=optax.constant_schedule(0.5)
    )
    epoch = functools.partial(
        train.train_epoch,
        batch_size=BATCH,
        step_fn=step_fn,
        refresh=train.stats_refresh(cfg, model),
    )
    return model, state, images, labels, epoch


def _data_stats(model, state, images):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    sample = images[:N].astype(jnp.float32) / 255.0
    return recalibrate.recalibrate(model, variables, sample, batch_size=N)


def test_statistics_are_the_datas_at_every_kth_step_and_fixed_between():
    model, state, images, labels, epoch = _setup(_cfg())
    key = jax.random.key(3)
    seen = []
    for start in range(5):
        if start % EVERY == 0:
            expected = _data_stats(model, state, images)  # with this step's weights
        state, _ = epoch(state, images, labels, key, start, 1, length=1)
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-4),
            state.batch_stats,
            expected,
        )
        seen.append(state.batch_stats)
    # Not a constant: the weights moved between refreshes, and with them the statistics.
    assert not np.allclose(seen[0]["block0"]["norm"]["mean"], seen[2]["block0"]["norm"]["mean"])
    # Between two refreshes the layer leaves them exactly as they were (momentum 1).
    jax.tree.map(np.testing.assert_array_equal, seen[0], seen[1])


def test_the_step_trains_with_the_statistics_it_just_computed():
    # Step 0's gradient is that of a population BN holding the data's statistics at step 0.
    cfg = _cfg()
    model, state, images, labels, epoch = _setup(cfg)
    key = jax.random.key(3)
    stats = _data_stats(model, state, images)
    batches = train.epoch_batches(key, 120, BATCH)
    x = images[batches[0]].astype(jnp.float32) / 255.0

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return train.cross_entropy(logits, labels[batches[0]])

    expected = optax.apply_updates(
        state.params, jax.tree.map(lambda g: -0.5 * g, jax.grad(loss)(state.params))
    )
    state, _ = epoch(state, images, labels, key, 0, 1, length=1)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        state.params,
        expected,
    )


def test_registered_with_its_fields_and_refuses_more_examples_than_the_split():
    spec = norms.get("population_batchnorm_data")
    assert spec.batch_stats and spec.refresh(_cfg().norm) == (EVERY, N)
    assert norms.get("population_batchnorm").refresh is None
    model, state, images, labels, epoch = _setup(_cfg(**{"norm.refresh_examples": "500"}))
    with pytest.raises(config.ConfigError, match="norm.refresh_examples=500 exceeds the 120"):
        epoch(state, images, labels, jax.random.key(3), 0, 1, length=1)


def test_a_measurement_at_a_refresh_step_sees_the_statistics_that_step_trains_with():
    """At step 0 the state still holds the initial 0/1 statistics; the diagnostics measure
    the network as the first step trains it, with the data's statistics."""
    from bnlab import data, diagnostics
    from bnlab.training import run

    cfg = _cfg(**{"diagnostics.names": "activations", "diagnostics.batch_size": "40"})
    model, state, images, labels, _ = _setup(cfg)
    train_set = data.Dataset(images, labels)
    tx = optax.sgd(0.5)
    diagnose = run.diagnose_program(cfg, model, tx, train_set, jax.random.key(4))["diagnose"]
    got = diagnose(state, 0)
    fresh = state._replace(batch_stats=_data_stats(model, state, images))
    batch = (images[:40].astype(jnp.float32) / 255.0, labels[:40])
    key = diagnostics.measurement_key(jax.random.key(4), 0)
    ctx = diagnostics.Context(model, tx, fresh, batch, key, cfg, jnp.float32(0.5))
    want = diagnostics.measure(ctx, ("activations",))
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
    stale = diagnostics.measure(ctx._replace(state=state), ("activations",))
    assert not np.allclose(got["activations/block0/std"], stale["activations/block0/std"])

"""`batchnorm_stopgrad`: BN's values and running statistics, without the gradient through the
batch statistics; against `batch_norm`, an inline stop-gradient reference and the closed form."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config, norms
from bnlab import norm as norm_lib
from bnlab.training import run

EPS = 1e-5
SHAPES = {"dense": (16, 6), "conv": (4, 3, 5, 6)}  # features on the last axis, 6 of them


def _normal(seed, shape, loc=0.0, scale=1.0):
    values = loc + scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(values, jnp.float32)


def _inputs(shape):
    x, ct = _normal(0, shape, loc=2.0, scale=3.0), _normal(1, shape)
    scale, bias = _normal(2, (6,), loc=1.0, scale=0.3), _normal(3, (6,))
    stats = {"mean": _normal(4, (6,)), "var": jnp.exp(_normal(5, (6,)))}
    return x, ct, scale, bias, stats


def _grads(fn, x, ct, scale, bias):
    """d sum(y * ct) / d(x, scale, bias) of `y = fn(x, scale, bias)`."""
    return jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2))(x, scale, bias)


def _ours(stats, **kwargs):
    fn = functools.partial(norm_lib.batch_norm_stopgrad, training=True, **kwargs)
    return lambda x, scale, bias: fn(x, stats, scale, bias)[0]


def _reference(x, scale, bias):
    """BN written out, its batch mean and variance under `stop_gradient`."""
    axes = tuple(range(x.ndim - 1))
    mu = jax.lax.stop_gradient(jnp.mean(x, axes))
    var = jax.lax.stop_gradient(jnp.mean(jnp.square(x - mu), axes))
    return (x - mu) / jnp.sqrt(var + EPS) * scale + bias


@pytest.mark.parametrize("convention", ["flax", "torch"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_values_and_statistics_are_batch_norms_exactly(shape, convention):
    x, _, scale, bias, stats = _inputs(shape)
    for training in (True, False):
        args = {"training": training, "momentum": 0.7, "convention": convention}
        ours = norm_lib.batch_norm_stopgrad(x, stats, scale, bias, **args)
        theirs = norm_lib.batch_norm(x, stats, scale, bias, **args)
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert ours[1] is stats  # evaluation returns the statistics themselves


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradients_equal_the_stop_gradient_reference_not_batch_norms(shape):
    x, ct, scale, bias, stats = _inputs(shape)
    dx, dscale, dbias = _grads(_ours(stats), x, ct, scale, bias)
    want = _grads(_reference, x, ct, scale, bias)
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # BN's gradient w.r.t. x has the statistics' terms; those w.r.t. scale and bias do not.
    bn_dx, bn_dscale, bn_dbias = _grads(_bn(stats), x, ct, scale, bias)
    assert np.abs(bn_dx - dx).max() > 0.1 * np.abs(dx).max()
    np.testing.assert_allclose((bn_dscale, bn_dbias), (dscale, dbias), rtol=1e-5, atol=1e-5)


def _bn(stats):
    fn = functools.partial(norm_lib.batch_norm, training=True)
    return lambda x, scale, bias: fn(x, stats, scale, bias)[0]


def test_gradient_is_the_closed_form():
    """dL/dx = dL/dy * scale / sqrt(var_B + eps), var_B the batch variance (float64 here)."""
    x, ct, scale, bias, stats = _inputs(SHAPES["conv"])
    dx, _, _ = _grads(_ours(stats), x, ct, scale, bias)
    var = np.asarray(x, np.float64).reshape(-1, 6).var(axis=0)
    np.testing.assert_allclose(dx, ct * scale / np.sqrt(var + EPS), rtol=1e-5, atol=1e-6)


def _value_and_grads(x, ct, scale, bias, stats, axis_name=None):
    fn = functools.partial(
        norm_lib.batch_norm_stopgrad, training=True, momentum=0.5, axis_name=axis_name
    )

    def loss(x, scale, bias):
        y, new = fn(x, stats, scale, bias)
        return jnp.sum(y * ct), (y, new)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)


def test_jit_equals_eager_and_batch_norm_under_jit():
    args = _inputs(SHAPES["conv"])
    eager = _value_and_grads(*args)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)  # XLA fusion
    jax.tree.map(close, jax.jit(_value_and_grads)(*args), eager)
    x, _, scale, bias, stats = args
    train = lambda fn: jax.jit(lambda x: fn(x, stats, scale, bias, training=True))  # noqa: E731
    ours, theirs = train(norm_lib.batch_norm_stopgrad)(x), train(norm_lib.batch_norm)(x)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_vmap_over_devices_with_axis_name_equals_the_global_batch():
    """4 slices of a batch under `vmap(axis_name=...)`: the statistics span them (as
    `batch_norm`'s do), so outputs, statistics and the gradient w.r.t. x are the global
    batch's; those w.r.t. scale and bias are each slice's share of them."""
    x, ct, scale, bias, stats = _inputs(SHAPES["dense"])
    (dx, dscale, dbias), (y, new) = _value_and_grads(x, ct, scale, bias, stats)
    split = lambda a: a.reshape((4, -1) + a.shape[1:])  # noqa: E731
    on_devices = jax.vmap(
        functools.partial(_value_and_grads, axis_name="d"),
        in_axes=(0, 0, None, None, None),
        axis_name="d",
    )
    (dx_d, dscale_d, dbias_d), (y_d, new_d) = on_devices(split(x), split(ct), scale, bias, stats)
    np.testing.assert_allclose(y_d.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_d.reshape(dx.shape), dx, rtol=1e-5, atol=1e-6)
    for key in new:
        np.testing.assert_allclose(new_d[key], jnp.broadcast_to(new[key], (4, 6)), rtol=1e-5)
    np.testing.assert_allclose(dscale_d.sum(0), dscale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbias_d.sum(0), dbias, rtol=1e-4, atol=1e-5)
    bn_y = jax.vmap(
        lambda x: norm_lib.batch_norm(x, stats, scale, bias, training=True, axis_name="d")[0],
        axis_name="d",
    )(split(x))
    np.testing.assert_array_equal(y_d, bn_y)


def test_vmap_over_independent_batches_equals_a_loop():
    x, ct, scale, bias, stats = _inputs(SHAPES["conv"])  # 4 batches of 3 x 5 positions
    vmapped = jax.vmap(_value_and_grads, in_axes=(0, 0, None, None, None))(
        x, ct, scale, bias, stats
    )
    for i in range(4):
        alone = _value_and_grads(x[i], ct[i], scale, bias, stats)
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
            vmapped,
            alone,
        )


def _layer(name):
    cfg = config.apply_overrides(config.default_config(), {"model.norm": name})
    return norms.build(config.validate(cfg))()


def test_registered_layer_has_batchnorms_values_and_the_stop_gradient():
    spec = norms.get("batchnorm_stopgrad")
    assert spec.batch_stats and spec.injected == ("momentum",)
    layer, bn = _layer("batchnorm_stopgrad"), _layer("batchnorm")
    x, ct, *_ = _inputs(SHAPES["conv"])
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    assert jax.tree.structure(variables) == jax.tree.structure(
        bn.init(jax.random.key(0), x, use_running_average=True)
    )

    def train(module, x):
        return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

    jax.tree.map(np.testing.assert_array_equal, train(layer, x), train(bn, x))
    dx = jax.grad(lambda x: jnp.sum(train(layer, x)[0] * ct))(x)
    var = np.asarray(x, np.float64).reshape(-1, 6).var(axis=0)
    np.testing.assert_allclose(dx, ct / np.sqrt(var + EPS), rtol=1e-5, atol=1e-6)


def test_trains_the_paper_mlp_with_a_finite_loss(make_config, tmp_path):
    cfg = make_config(
        "experiments/bn_paper_mlp.py",
        **{"model.norm": "batchnorm_stopgrad", "data.train_size": 600, "train.epochs": 1},
    )
    summary = run.run(cfg, tmp_path / "run")
    assert summary["status"] == "ok" and summary["steps"] == 10
    assert math.isfinite(summary["test_loss"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)

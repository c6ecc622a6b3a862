"""Tests of `bnlab.norm.batch_norm`: closed forms, float64 references, transforms, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnlab import norm

AXIS = "batch"  # the one named axis of these tests


def _rng(seed):
    return np.random.default_rng(seed)


def _normal(seed, shape, loc=0.0, scale=1.0, dtype=np.float32):
    return (loc + scale * _rng(seed).standard_normal(shape)).astype(dtype)


def _feature_axes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _reference(x, axis, scale=None, bias=None, epsilon=1e-5):
    """Float64 numpy BN: returns `(y, mean, var)`, the statistics of the feature shape."""
    x = np.asarray(x, np.float64)
    feature_axes = _feature_axes(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    mean = x.mean(reduce_axes, keepdims=True)
    var = ((x - mean) ** 2).mean(reduce_axes, keepdims=True)
    scale = 1.0 if scale is None else np.reshape(np.asarray(scale, np.float64), bshape)
    bias = 0.0 if bias is None else np.reshape(np.asarray(bias, np.float64), bshape)
    y = (x - mean) / np.sqrt(var + epsilon) * scale + bias
    fshape = tuple(x.shape[a] for a in feature_axes)
    return y, mean.reshape(fshape), var.reshape(fshape)


def _random_stats(seed, fshape):
    rng = _rng(seed)
    return {
        "mean": jnp.asarray(rng.standard_normal(fshape), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
    }


def _affine_params(seed, fshape):
    return _normal(seed, fshape, loc=1.0, scale=0.5), _normal(seed + 1, fshape, scale=0.5)


def _fshape(shape, axis):
    return tuple(shape[a] for a in _feature_axes(axis, len(shape)))


SHAPES_AXES = [
    ((16, 5), -1),
    ((5, 16), 0),
    ((4, 3, 5, 2), -1),
    ((4, 3, 5, 2), 1),
    ((4, 3, 5, 2), (1, 3)),
    ((4, 3, 5, 2), (-3, -1)),
]


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_one_step_from_init_gives_closed_form_moving_averages(momentum):
    x = _normal(0, (32, 4), loc=np.array([-2.0, 0.0, 1.0, 5.0]), scale=3.0)
    _, mu, var = _reference(x, -1)
    _, new = norm.batch_norm(x, norm.init_stats(4), training=True, momentum=momentum)
    np.testing.assert_allclose(new["mean"], (1 - momentum) * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], momentum + (1 - momentum) * var, rtol=1e-5, atol=1e-6)
    assert new["mean"].dtype == new["var"].dtype == jnp.float32


def test_momentum_may_be_a_traced_array():
    # A momentum schedule passes momentum as an array: no retrace per value.
    x = _normal(0, (16, 3), loc=1.0, scale=2.0)
    _, mu, var = _reference(x, -1)
    step = jax.jit(lambda x, m: norm.batch_norm(x, norm.init_stats(3), training=True, momentum=m))
    for momentum in (0.3, 0.9):
        _, new = step(x, jnp.float32(momentum))
        np.testing.assert_allclose(new["mean"], (1 - momentum) * mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["var"], momentum + (1 - momentum) * var, rtol=1e-5)
        assert new["mean"].dtype == new["var"].dtype == jnp.float32


def test_moving_averages_compose_over_steps():
    momentum, stats = 0.8, norm.init_stats(3)
    ref_mean, ref_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = _normal(step, (10, 3), loc=step, scale=1 + step)
        _, mu, var = _reference(x, -1)
        ref_mean = momentum * ref_mean + (1 - momentum) * mu
        ref_var = momentum * ref_var + (1 - momentum) * var
        _, stats = norm.batch_norm(x, stats, training=True, momentum=momentum)
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_training_output_and_stats_match_float64_reference(shape, axis):
    fshape = _fshape(shape, axis)
    x = _normal(1, shape, loc=0.5, scale=2.0)
    scale, bias = _affine_params(2, fshape)
    stats, momentum = _random_stats(3, fshape), 0.7
    y, new = norm.batch_norm(x, stats, scale, bias, training=True, momentum=momentum, axis=axis)
    y_ref, mu, var = _reference(x, axis, scale, bias)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        new["mean"], momentum * np.asarray(stats["mean"]) + (1 - momentum) * mu, atol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], momentum * np.asarray(stats["var"]) + (1 - momentum) * var, atol=1e-5
    )


def test_scale_and_bias_default_to_one_and_zero():
    x = _normal(4, (12, 3), loc=2.0)
    stats = norm.init_stats(3)
    y, _ = norm.batch_norm(x, stats, training=True)
    y1, _ = norm.batch_norm(x, stats, jnp.ones(3), jnp.zeros(3), training=True)
    np.testing.assert_array_equal(y, y1)
    np.testing.assert_allclose(y, _reference(x, -1)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), (1, 3))])
def test_eval_normalizes_with_stats_and_returns_them_bit_identical(shape, axis, jit):
    fshape = _fshape(shape, axis)
    x = _normal(5, shape, loc=1.0, scale=3.0)
    scale, bias = _affine_params(6, fshape)
    stats = _random_stats(7, fshape)
    fn = functools.partial(norm.batch_norm, training=False, momentum=0.5, axis=axis)
    if jit:
        fn = jax.jit(fn)
    y, new = fn(x, stats, scale, bias)
    bshape = tuple(
        shape[a] if a in _feature_axes(axis, len(shape)) else 1 for a in range(len(shape))
    )

    def b(v):
        return np.reshape(np.asarray(v, np.float64), bshape)

    y_ref = (x - b(stats["mean"])) / np.sqrt(b(stats["var"]) + 1e-5) * b(scale) + b(bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_array_equal(new[key], stats[key])
        assert new[key].dtype == stats[key].dtype
    # Evaluation is per example: the first example alone gives the same output.
    y0, _ = fn(x[:1], stats, scale, bias)
    np.testing.assert_allclose(y0, y[:1], rtol=1e-6, atol=1e-6)


def test_bf16_input_gives_bf16_output_and_float32_stats():
    x = jnp.asarray(_normal(8, (32, 4), loc=1.0, scale=2.0), jnp.bfloat16)
    x_exact = np.asarray(x.astype(jnp.float32), np.float64)  # the values bf16 holds
    scale, bias = _affine_params(9, (4,))
    y, new = norm.batch_norm(x, norm.init_stats(4), scale, bias, training=True, momentum=0.0)
    assert y.dtype == jnp.bfloat16
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    y_ref, mu, var = _reference(x_exact, -1, scale, bias)
    # Statistics are reduced in float32: far tighter than bf16's 3 significant digits.
    np.testing.assert_allclose(new["mean"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=1e-2, atol=1e-2)
    # Eval in bf16 too.
    y_eval, _ = norm.batch_norm(x, new, scale, bias, training=False)
    assert y_eval.dtype == jnp.bfloat16


def test_single_example_batch_gives_zero_var_and_bias_output():
    # Refused by default (test_one_value_per_feature_in_training_is_refused_unless_allowed);
    # allowed, the math is what it is.
    x = _normal(10, (1, 5), loc=3.0, scale=10.0)
    scale, bias = _affine_params(11, (5,))
    y, new = norm.batch_norm(
        x, norm.init_stats(5), scale, bias, training=True, momentum=0.0, allow_single_value=True
    )
    np.testing.assert_array_equal(new["var"], np.zeros(5, np.float32))
    np.testing.assert_array_equal(new["mean"], x[0])
    np.testing.assert_array_equal(y, bias[None])


def test_constant_features_give_finite_output_and_nonnegative_var():
    x = _normal(12, (10, 4))
    x[:, 1] = 0.1
    x[:, 2] = 1e4 + 0.7
    y, new = norm.batch_norm(x, norm.init_stats(4), training=True, momentum=0.0)
    assert np.all(np.isfinite(y))
    assert np.all(np.asarray(new["var"]) >= 0)
    np.testing.assert_allclose(y[:, 0], _reference(x, -1)[0][:, 0], rtol=1e-5, atol=1e-5)


def test_constant_features_give_var_exactly_zero():
    n = 6
    x = np.stack(
        [np.full(n, c, np.float32) for c in (0.1, 1 / 3, -2.3, 123.456, 1e4 + 0.7)], axis=1
    )
    bias = _normal(13, (5,))
    y, new = norm.batch_norm(x, norm.init_stats(5), None, bias, training=True, momentum=0.0)
    np.testing.assert_array_equal(new["var"], np.zeros(5, np.float32))
    np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))


def test_large_offset_variance_matches_float64_reference():
    # E[x^2] - E[x]^2 in float32 would lose every digit here (x^2 ~ 1e8, ulp ~ 8).
    x = _normal(14, (256, 3), loc=1e4, scale=np.array([0.1, 1.0, 10.0]))
    _, mu, var = _reference(x, -1)
    y, new = norm.batch_norm(x, norm.init_stats(3), training=True, momentum=0.0)
    np.testing.assert_allclose(new["var"], var, rtol=1e-4)
    np.testing.assert_allclose(new["mean"], mu, rtol=3e-7)  # a few float32 ulps
    np.testing.assert_allclose(y, _reference(x, -1)[0], atol=1e-2)  # ulp(1e4) / 0.1


@functools.partial(jax.jit, static_argnames=("backward", "axis"))
def _vjp_all(x, stats, scale, bias, cts, *, backward, axis):
    """`(y, new_stats)` and the VJP w.r.t. `(x, scale, bias)` of cotangents on both outputs."""

    def f(x, scale, bias):
        return norm.batch_norm(
            x, stats, scale, bias, training=True, momentum=0.6, axis=axis, backward=backward
        )

    out, vjp = jax.vjp(f, x, scale, bias)
    return out, vjp(cts)


@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((5, 16), 0), ((4, 3, 5, 2), (1, 3))])
def test_analytic_vjp_matches_autodiff(shape, axis):
    fshape = _fshape(shape, axis)
    x = _normal(15, shape, loc=-1.0, scale=2.0)
    scale, bias = _affine_params(16, fshape)
    stats = _random_stats(17, fshape)
    zero = np.zeros(fshape, np.float32)
    dstats_options = {
        "y only": {"mean": zero, "var": zero},
        "through new_stats": {"mean": _normal(18, fshape), "var": _normal(19, fshape)},
    }
    for seed, dstats in enumerate(dstats_options.values()):
        cts = (_normal(20 + seed, shape), dstats)
        out_a, grads_a = _vjp_all(x, stats, scale, bias, cts, backward="analytic", axis=axis)
        out_d, grads_d = _vjp_all(x, stats, scale, bias, cts, backward="autodiff", axis=axis)
        jax.tree.map(
            lambda a, d: np.testing.assert_allclose(a, d, rtol=1e-6, atol=1e-6), out_a, out_d
        )
        for ga, gd, primal in zip(grads_a, grads_d, (x, scale, bias), strict=True):
            assert ga.shape == gd.shape == primal.shape and ga.dtype == primal.dtype
            np.testing.assert_allclose(ga, gd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", norm.BACKWARDS)
def test_gradient_through_y_sums_to_zero_over_the_batch(backward):
    # y is invariant to adding a per-feature constant to x, so sum_batch dx == 0 ...
    x, ct = _normal(21, (12, 3), scale=2.0), _normal(22, (12, 3))
    stats = _random_stats(23, (3,))
    zero = np.zeros(3, np.float32)
    cts = (ct, {"mean": zero, "var": zero})
    _, (dx, _, _) = _vjp_all(x, stats, None, None, cts, backward=backward, axis=-1)
    np.testing.assert_allclose(dx.sum(0), zero, atol=1e-5)
    # ... and the cotangent of new_stats["mean"] reaches x as (1 - momentum) / n per example.
    dmean = _normal(24, (3,))
    _, (dx_m, _, _) = _vjp_all(
        x, stats, None, None, (0 * ct, {"mean": dmean, "var": zero}), backward=backward, axis=-1
    )
    np.testing.assert_allclose(dx_m, np.broadcast_to((1 - 0.6) * dmean / 12, x.shape), rtol=1e-5)


@pytest.mark.parametrize("backward", norm.BACKWARDS)
def test_check_grads_in_float64(backward):
    with jax.enable_x64(True):
        x = jnp.asarray(_normal(23, (6, 3), scale=2.0, dtype=np.float64))
        scale = jnp.asarray(_normal(24, (3,), loc=1.0, dtype=np.float64))
        bias = jnp.asarray(_normal(25, (3,), dtype=np.float64))
        stats = {"mean": jnp.zeros(3, jnp.float64), "var": jnp.ones(3, jnp.float64)}

        @jax.jit
        def f(x, scale, bias):
            return norm.batch_norm(x, stats, scale, bias, training=True, backward=backward)

        # The statistics are reduced in float32 by design, so finite differences are only
        # float32-accurate: a wide step and matching tolerances (a wrong formula is off by O(1)).
        check_grads(f, (x, scale, bias), order=1, modes=("rev",), eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "x_dtype,scale_dtype,bias_dtype",
    [
        (jnp.float32, jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        pytest.param(jnp.float32, None, jnp.bfloat16),
        pytest.param(jnp.float32, jnp.float32, jnp.bfloat16),
        pytest.param(jnp.float32, jnp.bfloat16, jnp.float32),
    ],
)
def test_gradients_have_the_dtypes_of_their_primals(x_dtype, scale_dtype, bias_dtype):
    x = jnp.asarray(_normal(26, (8, 3)), x_dtype)
    scale = None if scale_dtype is None else jnp.ones(3, scale_dtype)
    bias = jnp.zeros(3, bias_dtype)

    def loss(x, scale, bias):
        y, _ = norm.batch_norm(x, norm.init_stats(3), scale, bias, training=True)
        return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    assert grads[0].dtype == x.dtype
    if scale is not None:
        assert grads[1].dtype == scale.dtype
    assert grads[2].dtype == bias.dtype


def test_jit_equals_eager():
    x = _normal(27, (4, 3, 5, 2), loc=1.0)
    scale, bias = _affine_params(28, (3,))
    stats = _random_stats(29, (3,))
    ct = _normal(30, x.shape)

    def run(x, scale, bias, training):
        return norm.batch_norm(x, stats, scale, bias, training=training, axis=1, momentum=0.9)

    def loss(x, scale, bias):
        y, new = run(x, scale, bias, True)
        return jnp.sum(y * ct) + jnp.sum(new["var"])

    for training in (True, False):
        eager = run(x, scale, bias, training)
        jitted = jax.jit(run, static_argnums=3)(x, scale, bias, training)
        jax.tree.map(
            lambda e, j: np.testing.assert_allclose(e, j, rtol=1e-6, atol=1e-6), eager, jitted
        )
    grad = jax.grad(loss, argnums=(0, 1, 2))
    jax.tree.map(
        lambda e, j: np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6),
        grad(x, scale, bias),
        jax.jit(grad)(x, scale, bias),
    )


def _grouped(a, groups):
    return a.reshape((groups, a.shape[0] // groups) + a.shape[1:])


@pytest.mark.parametrize(
    "backward,convention", [("analytic", "flax"), ("autodiff", "flax"), ("analytic", "torch")]
)
def test_vmap_with_axis_name_equals_global_batch(backward, convention):
    groups, shape = 4, (12, 5)
    x = _normal(31, shape, loc=2.0, scale=3.0)
    scale, bias = _affine_params(32, (5,))
    stats = _random_stats(33, (5,))
    ct, wm, wv = _normal(34, shape), _normal(35, (5,)), _normal(36, (5,))
    kw = dict(training=True, momentum=0.6, backward=backward, convention=convention)

    def bn(x, scale, bias, axis_name=None):
        return norm.batch_norm(x, stats, scale, bias, axis_name=axis_name, **kw)

    # Each group's loss sees the (shared) statistics once, so the sum over groups sees them
    # `groups` times: that sum's gradient is what vmap(grad) returns, summed over groups.
    def loss(x, scale, bias, ct, stat_weight, axis_name=None):
        y, new = bn(x, scale, bias, axis_name)
        return jnp.sum(y * ct) + stat_weight * jnp.sum(new["mean"] * wm + new["var"] * wv)

    per_group_grad = jax.vmap(
        jax.grad(functools.partial(loss, stat_weight=1, axis_name=AXIS), argnums=(0, 1, 2)),
        in_axes=(0, None, None, 0),
        axis_name=AXIS,
    )

    @jax.jit
    def run(x, scale, bias, ct):
        xg = _grouped(x, groups)
        return (
            bn(x, scale, bias),
            jax.vmap(lambda xs: bn(xs, scale, bias, AXIS), axis_name=AXIS)(xg),
            jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias, ct, groups),
            per_group_grad(xg, scale, bias, _grouped(ct, groups)),
        )

    (y, new), (y_g, new_g), grads, grads_g = run(x, scale, bias, ct)
    np.testing.assert_allclose(y_g.reshape(shape), y, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_g[key], np.broadcast_to(new[key], (groups, 5)), rtol=1e-5)
    np.testing.assert_allclose(grads_g[0].reshape(shape), grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads_g[1].sum(0), grads[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads_g[2].sum(0), grads[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "backward",
    [
        pytest.param(
            "analytic",
            marks=pytest.mark.xfail(
                raises=NameError,
                strict=True,
                reason="known limitation: the custom VJP bwd psums over axis_name, unbound "
                "when jax.grad is outside jax.vmap(axis_name=...)",
            ),
        ),
        "autodiff",
    ],
)
def test_grad_of_vmap_with_axis_name_equals_global_gradient(backward):
    groups, shape = 3, (12, 4)
    x, ct = _normal(37, shape, loc=1.0, scale=2.0), _normal(38, shape)
    stats = norm.init_stats(4)

    def bn(x, axis_name=None):
        return norm.batch_norm(x, stats, training=True, axis_name=axis_name, backward=backward)[0]

    def loss_vmapped(x):
        y = jax.vmap(functools.partial(bn, axis_name=AXIS), axis_name=AXIS)(_grouped(x, groups))
        return jnp.sum(y.reshape(shape) * ct)

    expected = jax.jit(jax.grad(lambda x: jnp.sum(bn(x) * ct)))(x)
    actual = jax.jit(jax.grad(loss_vmapped))(x)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _pmap_forward_and_grad(bn, devices):
    """pmap over `devices` of `x, ct -> (bn(x), d sum(bn(x)[0] * ct) / dx)` for each backward."""

    def run(x, ct):
        def loss(x, backward):
            return jnp.sum(bn(x, backward, AXIS)[0] * ct)

        grads = {b: jax.grad(loss)(x, b) for b in norm.BACKWARDS}
        return bn(x, "analytic", AXIS), grads

    return jax.pmap(run, axis_name=AXIS, devices=jax.devices()[:devices])


@jax.jit
def _global_autodiff_grad(x, ct, stats):
    def loss(x):
        y, _ = norm.batch_norm(x, stats, training=True, axis=1, backward="autodiff")
        return jnp.sum(y * ct)

    return jax.grad(loss)(x)


def test_pmap_over_8_devices_equals_global_batch():
    devices = jax.device_count()
    assert devices == 8, "tests/conftest.py sets 8 CPU devices"
    shape = (devices * 2, 3, 2)  # axis=1: statistics over the batch and the last axis
    x = _normal(39, shape, loc=-3.0, scale=2.0)
    stats, ct = _random_stats(41, (3,)), _normal(42, shape)

    def bn(x, backward, axis_name=None):
        return norm.batch_norm(
            x, stats, training=True, axis=1, momentum=0.5, axis_name=axis_name, backward=backward
        )

    (y_p, new_p), dx_p = _pmap_forward_and_grad(bn, devices)(
        _grouped(x, devices), _grouped(ct, devices)
    )
    y, new = jax.jit(bn, static_argnums=1)(x, "autodiff")
    np.testing.assert_allclose(np.asarray(y_p).reshape(shape), y, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_p[key], np.broadcast_to(new[key], (devices, 3)), rtol=1e-5)
    # Under pmap, the gradient of one device's loss is that of the sum of all devices' losses.
    expected = _global_autodiff_grad(x, ct, stats)
    for backward in norm.BACKWARDS:
        np.testing.assert_allclose(
            np.asarray(dx_p[backward]).reshape(shape), expected, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("groups", [((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 2, 4, 6), (1, 3, 5, 7))])
def test_axis_index_groups_give_each_group_its_own_statistics(groups):
    devices, per_device, features = 8, 2, 3
    x = _normal(43, (devices, per_device, features, 2), scale=2.0)
    x[list(groups[1])] += 5.0  # the two groups have visibly different statistics
    ct = _normal(44, x.shape)
    stats = norm.init_stats(features)

    def bn(x, backward, axis_name=None):
        return norm.batch_norm(
            x,
            stats,
            training=True,
            momentum=0.0,
            axis=1,
            backward=backward,
            axis_name=axis_name,
            axis_index_groups=groups,
        )

    (y, new), grads = _pmap_forward_and_grad(bn, devices)(x, ct)
    for group in groups:
        idx = np.asarray(group)
        xg = x[idx].reshape(-1, features, 2)
        y_ref, mu, var = _reference(xg, 1)
        np.testing.assert_allclose(np.asarray(y)[idx].reshape(xg.shape), y_ref, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(new["mean"])[idx], np.broadcast_to(mu, (4, 3)), atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(new["var"])[idx], np.broadcast_to(var, (4, 3)), rtol=1e-5
        )
        dx_ref = _global_autodiff_grad(xg, ct[idx].reshape(xg.shape), stats)
        for backward in norm.BACKWARDS:
            np.testing.assert_allclose(
                np.asarray(grads[backward])[idx].reshape(xg.shape), dx_ref, rtol=1e-4, atol=1e-5
            )


def _torch_reference_steps(batches, torch_m, epsilon, weight, bias):
    """numpy transcription of torch.nn.BatchNorm1d's documented training-mode formulas.

    running = (1 - momentum) * running + momentum * batch_stat, the running variance uses the
    unbiased batch variance, the output the biased one.
    """
    rm, rv = np.zeros(weight.shape), np.ones(weight.shape)
    outputs = []
    for x in batches:
        x = np.asarray(x, np.float64)
        n = x.shape[0]
        mean, var_biased = x.mean(0), x.var(0)
        outputs.append((x - mean) / np.sqrt(var_biased + epsilon) * weight + bias)
        rm = (1 - torch_m) * rm + torch_m * mean
        rv = (1 - torch_m) * rv + torch_m * var_biased * n / (n - 1)
    return outputs, rm, rv


def test_torch_momentum_is_weight_of_old_statistics():
    assert norm.torch_momentum(0.1) == pytest.approx(0.9)
    assert norm.torch_momentum(0.0) == 1.0 and norm.torch_momentum(1.0) == 0.0


def test_torch_convention_one_step_uses_unbiased_variance():
    x = _normal(45, (6, 3), loc=1.0, scale=2.0)
    momentum = norm.torch_momentum(0.1)
    _, new = norm.batch_norm(
        x, norm.init_stats(3), training=True, momentum=momentum, convention="torch"
    )
    n = x.shape[0]
    var_unbiased = np.asarray(x, np.float64).var(0) * n / (n - 1)
    np.testing.assert_allclose(
        new["var"], momentum * 1.0 + (1 - momentum) * var_unbiased, rtol=1e-5
    )
    np.testing.assert_allclose(new["mean"], (1 - momentum) * x.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("torch_m", [0.1, 0.5])
def test_torch_convention_several_steps_match_torch_formulas(torch_m):
    weight, bias = _affine_params(46, (3,))
    batches = [_normal(47 + i, (5 + i, 3), loc=i, scale=1 + i) for i in range(3)]
    ref_out, rm, rv = _torch_reference_steps(batches, torch_m, 1e-5, weight, bias)
    stats = norm.init_stats(3)
    for x, y_ref in zip(batches, ref_out, strict=True):
        y, stats = norm.batch_norm(
            x,
            stats,
            weight,
            bias,
            training=True,
            momentum=norm.torch_momentum(torch_m),
            convention="torch",
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], rv, rtol=1e-5, atol=1e-6)


def test_torch_eval_with_imported_stats_matches_torch_formula():
    rng = _rng(50)
    running_mean = rng.standard_normal(4)  # float64, as a torch state_dict converted to numpy
    running_var = rng.uniform(0.2, 3.0, 4)
    weight, bias = _affine_params(51, (4,))
    x = _normal(52, (7, 4), loc=1.0, scale=2.0)
    stats = norm.stats_from_torch(running_mean, running_var)
    assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
    y, new = norm.batch_norm(x, stats, weight, bias, training=False, convention="torch")
    y_ref = (x - running_mean) / np.sqrt(running_var + 1e-5) * weight + bias
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new["var"], stats["var"])


def test_torch_convention_counts_elements_across_devices():
    groups, shape = 4, (8, 3)
    x = _normal(53, shape, scale=2.0)
    grouped_bn = jax.jit(
        jax.vmap(
            lambda xs: norm.batch_norm(
                xs,
                norm.init_stats(3),
                training=True,
                momentum=0.0,
                convention="torch",
                axis_name=AXIS,
            ),
            axis_name=AXIS,
        )
    )
    _, new_g = grouped_bn(_grouped(x, groups))
    n = shape[0]  # the global count, not the 2 examples of one group
    var_unbiased = np.asarray(x, np.float64).var(0) * n / (n - 1)
    np.testing.assert_allclose(new_g["var"], np.broadcast_to(var_unbiased, (groups, 3)), rtol=1e-5)


def _call(x=None, stats=None, **kw):
    x = np.ones((4, 3), np.float32) if x is None else x
    stats = norm.init_stats(3) if stats is None else stats
    kw.setdefault("training", True)
    return norm.batch_norm(x, stats, **kw)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stats=norm.init_stats(4)), "stats"),
        (dict(stats={"mean": jnp.zeros(3)}), "var"),
        (dict(scale=jnp.ones(4)), "scale"),
        (dict(bias=jnp.ones((3, 1))), "bias"),
        (dict(axis=2), "out of range"),
        (dict(axis=-3), "out of range"),
        (dict(axis=(1, -1)), "twice"),
        (dict(axis=(0, 1)), "no axis"),
        (dict(convention="tf"), "convention"),
        (dict(backward="numeric"), "backward"),
        (dict(momentum=1.5), "momentum"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(stats=norm.init_stats(4), training=False), "stats"),
        (dict(mask=np.ones(5)), "mask"),
        (dict(mask=np.ones((4, 3))), "mask"),  # weights must not vary over the features
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_unequal_axis_index_groups_raise_value_error():
    with pytest.raises(ValueError, match="axis_index_groups"):
        jax.pmap(
            lambda x: _call(x, axis_name=AXIS, axis_index_groups=[[0, 1, 2], [3, 4, 5, 6, 7]]),
            axis_name=AXIS,
        )(np.ones((8, 4, 3), np.float32))


@pytest.mark.parametrize("wrap", ["eager", "jit", "vmap_other_name"])
def test_unbound_axis_name_raises_name_error_naming_the_axis(wrap):
    def f(x):
        return _call(x, axis_name="devices")[0]

    x = np.ones((4, 3), np.float32)
    if wrap == "jit":
        f = jax.jit(f)
    elif wrap == "vmap_other_name":
        f, x = jax.vmap(f, axis_name="other"), x[None]
    with pytest.raises(NameError, match="devices"):
        f(x)


@pytest.mark.parametrize("backward", norm.BACKWARDS)
@pytest.mark.parametrize("convention", norm.CONVENTIONS)
def test_mask_gives_the_statistics_and_gradients_of_the_unpadded_batch(backward, convention):
    shape, real = (10, 3, 2), np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    x, ct = _normal(61, shape, loc=3.0, scale=2.0), _normal(62, shape) * real[:, None, None]
    x[~real] = -1e3  # padding values must not leak into the statistics
    stats, (scale, bias) = _random_stats(63, (3,)), _affine_params(64, (3,))
    kw = dict(training=True, axis=1, momentum=0.3, convention=convention)

    def loss(x, scale, bias, ct, mask=None, backward="autodiff"):
        y, new = norm.batch_norm(x, stats, scale, bias, mask=mask, backward=backward, **kw)
        return jnp.sum(y * ct), (y, new)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, (y, new)), grads = jax.jit(grad)(x[real], scale, bias, ct[real])
    (_, (y_m, new_m)), grads_m = jax.jit(grad, static_argnums=5)(x, scale, bias, ct, real, backward)
    np.testing.assert_allclose(y_m[real], y, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_m[key], new[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads_m[0][real], grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grads_m[0][~real], 0.0)  # no loss, no statistics through them
    for g_m, g in zip(grads_m[1:], grads[1:], strict=True):
        np.testing.assert_allclose(g_m, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", ["analytic", "autodiff"])
def test_nonfinite_padding_never_reaches_the_statistics_or_gradients(backward):
    """Padding rows (weight 0) hold NaN and inf, padding is row 0 (where the one-pass shift
    used to come from): statistics, real rows' outputs and every gradient equal those of the
    real rows alone."""
    rng = np.random.default_rng(0)
    real = rng.normal(3.0, 2.0, (6, 5)).astype(np.float32)
    x = np.concatenate([np.full((1, 5), np.nan, np.float32), real, np.full((2, 5), np.inf)])
    mask = np.array([0] + [1] * 6 + [0, 0], np.float32)
    stats, scale, bias = norm.init_stats(5), jnp.full(5, 1.5), jnp.full(5, 0.25)
    ct = rng.normal(size=x.shape).astype(np.float32)

    rows = np.flatnonzero(mask)

    def loss(fn_x, fn_scale, fn_bias, m, picked):
        y, new = norm.batch_norm(fn_x, stats, fn_scale, fn_bias, training=True, mask=m,
                                 backward=backward)  # fmt: skip
        return jnp.sum(y[picked] * ct[rows]), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(x), scale, bias, jnp.asarray(mask), rows
    )
    (_, (y_ref, new_ref)), grads_ref = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(real), scale, bias, None, slice(None)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, new_ref)
    np.testing.assert_allclose(y[rows], y_ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(grads[0][rows], grads_ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grads[0][mask == 0], 0.0)
    np.testing.assert_allclose(grads[1], grads_ref[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[2], grads_ref[2], rtol=1e-4, atol=1e-5)


def test_nonfinite_padding_across_devices_equals_the_real_rows_on_one_device():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4, 3)).astype(np.float32)  # 8 devices x 4 rows
    mask = (rng.uniform(size=(8, 4)) > 0.4).astype(np.float32)
    mask[3] = 0.0  # a device with nothing but padding
    x = np.where(mask[..., None] > 0, x, np.nan).astype(np.float32)
    stats = norm.init_stats(3)
    mapped = jax.pmap(
        lambda xs, m: norm.batch_norm(xs, stats, training=True, mask=m, axis_name="d")[1],
        axis_name="d",
    )(x, mask)
    real = x.reshape(-1, 3)[mask.reshape(-1) > 0]
    _, want = norm.batch_norm(real, stats, training=True)
    for key in ("mean", "var"):
        np.testing.assert_allclose(mapped[key][0], want[key], rtol=1e-5, atol=1e-6)


def test_one_value_per_feature_in_training_is_refused_unless_allowed():
    x = jnp.ones((1, 4))
    with pytest.raises(ValueError, match="one value per feature"):
        norm.batch_norm(x, norm.init_stats(4), training=True)
    y, new = norm.batch_norm(x, norm.init_stats(4), training=True, allow_single_value=True)
    assert np.all(np.isfinite(y))
    norm.batch_norm(jnp.ones((1, 3, 3, 4)), norm.init_stats(4), training=True)  # 9 values: fine
    norm.batch_norm(x, norm.init_stats(4), training=False)  # evaluation normalizes with the stats


def test_init_stats_refuses_a_feature_size_that_is_not_a_positive_int():
    for bad in (0, -3, (4, 0), ()):
        with pytest.raises(
            ValueError,
            match="init_stats: feature_shape=.* every size must be >= 1|must be a positive int",
        ):
            norm.init_stats(bad)
    with pytest.raises(ValueError, match=r"feature_shape=6.0 must be a positive int"):
        norm.init_stats(6.0)
    assert norm.init_stats(np.int64(3))["var"].shape == (3,)
    assert norm.init_stats((2, 3))["mean"].shape == (2, 3)

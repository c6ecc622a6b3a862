"""The normalization variants' pure functions and layers against their references: batch_norm
per slice, closed forms, autodiff, flax's LayerNorm/GroupNorm, and 8 devices vs one."""

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config, layers, norm, norms

AXIS = "devices"


def _normal(seed, shape, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _close(a, b, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _stats(seed, features):
    rng = np.random.default_rng(seed)
    return {
        "mean": jnp.asarray(rng.standard_normal(features), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
    }


def _loss_grads(fn):
    """For `fn(x, stats, scale, bias) -> (y, new_stats)`:
    `(x, stats, scale, bias, ct) -> ((y, new_stats), d sum(y * ct) / d(x, scale, bias))`."""

    def run(x, stats, scale, bias, ct):
        def loss(x, scale, bias):
            y, new = fn(x, stats, scale, bias)
            return jnp.sum(y.astype(jnp.float32) * ct), (y, new)

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, out), grads = grad(x, scale, bias)
        return out, grads

    return run


def _value_and_grads(fn):
    return jax.jit(_loss_grads(fn))


# --- ghost batch norm -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, axis, backward, convention",
    [
        ((12, 5), -1, "analytic", "flax"),
        ((12, 3, 4, 2), (1, 3), "autodiff", "flax"),
        ((12, 3, 2), 1, "analytic", "torch"),
    ],
)
def test_ghost_equals_batch_norm_on_each_slice_over_steps(shape, axis, backward, convention):
    v = 4
    x = _normal(1, (3,) + shape, loc=2.0, scale=3.0)  # three steps
    fshape = tuple(shape[a] for a in norm.feature_axes_of(axis, len(shape)))
    scale, bias, ct = _normal(2, fshape, 1.0), _normal(3, fshape), _normal(4, shape)
    kw = dict(training=True, momentum=0.7, axis=axis, backward=backward, convention=convention)
    ghost = _value_and_grads(functools.partial(norm.ghost_batch_norm, virtual_batch_size=v, **kw))
    bn = _value_and_grads(functools.partial(norm.batch_norm, **kw))
    stats = ref_stats = _stats(5, fshape)
    for step in range(3):
        (y, stats), grads = ghost(x[step], stats, scale, bias, ct)
        slices = [
            bn(x[step][i : i + v], ref_stats, scale, bias, ct[i : i + v])
            for i in range(0, shape[0], v)
        ]
        _close(y, np.concatenate([s[0][0] for s in slices]))
        _close(grads[0], np.concatenate([s[1][0] for s in slices]), atol=1e-4)
        _close(grads[1:], jax.tree.map(lambda *g: sum(g), *[s[1][1:] for s in slices]), atol=1e-4)
        # The moving average is linear: the mean of each slice's BN update.
        ref_stats = jax.tree.map(lambda *s: np.mean(s, 0), *[s[0][1] for s in slices])
        _close(stats, ref_stats)


def test_ghost_with_one_virtual_batch_is_batch_norm():
    x, stats = _normal(6, (8, 3), loc=1.0, scale=2.0), _stats(7, 3)
    kw = dict(training=True, momentum=0.5)
    want = norm.batch_norm(x, stats, **kw)
    _close(norm.ghost_batch_norm(x, stats, virtual_batch_size=8, **kw), want, 1e-6, 1e-6)
    # Evaluation is batch_norm's, whatever the batch.
    got = norm.ghost_batch_norm(x[:3], stats, training=False, virtual_batch_size=8)
    _close(got, norm.batch_norm(x[:3], stats, training=False), 0, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"virtual_batch_size": 5}, "does not divide the batch of 12"),
        ({"virtual_batch_size": 4, "axis": 0}, "names the batch axis"),
    ],
)
def test_ghost_refuses_bad_virtual_batches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        norm.ghost_batch_norm(jnp.ones((12, 3)), norm.init_stats(12 if "axis" in kwargs else 3),
                              training=True, **kwargs)  # fmt: skip


# --- batch renormalization --------------------------------------------------------------------


@pytest.mark.parametrize("backward", norm.BACKWARDS)
@pytest.mark.parametrize("convention", norm.CONVENTIONS)
def test_renorm_at_r_max_1_d_max_0_is_batch_norm_exactly(backward, convention):
    x, ct = _normal(8, (16, 3, 4), loc=-1.0, scale=2.0), _normal(9, (16, 3, 4))
    scale, bias, stats = _normal(10, (4,), 1.0), _normal(11, (4,)), _stats(12, 4)
    kw = dict(training=True, momentum=0.8, backward=backward, convention=convention)
    renorm = _value_and_grads(functools.partial(norm.batch_renorm, r_max=1.0, d_max=0.0, **kw))
    bn = _value_and_grads(functools.partial(norm.batch_norm, **kw))
    args = (x, stats, scale, bias, ct)
    jax.tree.map(np.testing.assert_array_equal, renorm(*args), bn(*args))


def _renorm_reference(x, stats, scale, bias, r_max, d_max, eps=1e-5):
    """Ioffe (2017), Alg. 1, written out with jnp: r and d are stop-gradient constants."""
    mu = jnp.mean(x, 0)
    sigma_b = jnp.sqrt(jnp.mean((x - mu) ** 2, 0) + eps)
    sigma = jnp.sqrt(stats["var"] + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mu - stats["mean"]) / sigma, -d_max, d_max))
    return ((x - mu) / sigma_b * r + d) * scale + bias, (r, d)


@pytest.mark.parametrize("backward", norm.BACKWARDS)
def test_renorm_matches_the_closed_form_with_r_and_d_constant(backward):
    # Features chosen so that r and d are clipped for some and not for others.
    x = _normal(13, (64, 4)) * np.array([0.3, 1.0, 1.2, 4.0], np.float32) + np.array(
        [0.0, 3.0, -0.2, 0.5], np.float32
    )
    stats = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    scale, bias, ct = _normal(14, (4,), 1.0), _normal(15, (4,)), _normal(16, (64, 4))
    r_max, d_max = 1.5, 0.5
    (_, (r, d)) = _renorm_reference(x, stats, scale, bias, r_max, d_max)
    assert (r == r_max).any() and (r == 1 / r_max).any() and ((r > 1 / r_max) & (r < r_max)).any()
    assert (jnp.abs(d) == d_max).any() and (jnp.abs(d) < d_max).any()
    renorm = functools.partial(norm.batch_renorm, r_max=r_max, d_max=d_max, backward=backward)
    got = _value_and_grads(functools.partial(renorm, training=True, momentum=0.9))(
        x, stats, scale, bias, ct
    )
    want = _value_and_grads(
        lambda x, stats, scale, bias: _renorm_reference(x, stats, scale, bias, r_max, d_max)
    )(x, stats, scale, bias, ct)
    _close(got[0][0], want[0][0])
    _close(got[1], want[1], atol=1e-4)
    batch_var = np.var(x.astype(np.float64), 0)
    _close(got[0][1], {"mean": 0.1 * x.mean(0), "var": 0.9 + 0.1 * batch_var})
    _assert_no_gradient_to_the_running_statistics(
        functools.partial(renorm, training=True), x, stats, ct
    )


def _assert_no_gradient_to_the_running_statistics(fn, x, stats, ct):
    """The statistics `fn` normalizes with are constants of its output (stop-gradient)."""
    grads = jax.jit(jax.grad(lambda stats: jnp.sum(fn(x, stats)[0] * ct)))(stats)
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, np.zeros_like(g)), grads)


def test_renorm_bounds_may_be_traced():
    x, stats = _normal(17, (16, 3), scale=3.0), _stats(18, 3)
    bounds = jnp.array([[1.0, 0.0], [1.5, 0.2], [3.0, 5.0]])

    def fn(b):
        return norm.batch_renorm(x, stats, training=True, r_max=b[0], d_max=b[1])

    batched = jax.jit(jax.vmap(fn))(bounds)
    for i, (r_max, d_max) in enumerate(bounds.tolist()):
        alone = norm.batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max)
        _close(jax.tree.map(lambda a, i=i: a[i], batched), alone, 1e-6, 1e-6)


def test_renorm_schedule_follows_the_paper_shape():
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=100, r_max_steps=700, d_max_steps=400)
    steps = np.array([0, 99, 100, 450, 500, 800, 5000])
    r, d = norm.renorm_schedule(steps, **kw)
    np.testing.assert_allclose(r, [1, 1, 1, 1 + 2 * 350 / 700, 1 + 2 * 400 / 700, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 0, 5 * 350 / 400, 5, 5, 5])
    r, d = norm.renorm_schedule(steps, **{**kw, "r_max_steps": 0, "d_max_steps": 0})
    np.testing.assert_allclose(r, [1, 1, 3, 3, 3, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 5, 5, 5, 5, 5])
    with pytest.raises(ValueError, match="r_max=0.5 must be >= 1"):
        norm.batch_renorm(jnp.ones((4, 2)), norm.init_stats(2), training=True, r_max=0.5, d_max=0)


# --- noisy batch norm -------------------------------------------------------------------------


def test_noisy_at_zero_noise_and_in_evaluation_is_batch_norm():
    x, stats = _normal(19, (16, 2, 3), loc=1.0), _stats(20, 3)
    key = jax.random.key(0)
    for training in (True, False):
        got = norm.noisy_batch_norm(x, stats, training=training, key=key, noise_mean=0.0,
                                    noise_std=0.0, momentum=0.5)  # fmt: skip
        want = norm.batch_norm(x, stats, training=training, momentum=0.5)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    evaluated = norm.noisy_batch_norm(x, stats, training=False, key=key, noise_mean=1.0,
                                      noise_std=2.0)  # fmt: skip
    jax.tree.map(
        np.testing.assert_array_equal, evaluated, norm.batch_norm(x, stats, training=False)
    )


def test_noisy_noise_has_the_drawn_per_feature_mean_and_std_and_changes_every_key():
    batch, features, a, b = 2000, 6, 1.0, 2.0
    x, stats = _normal(21, (batch, features)), norm.init_stats(features)
    clean, _ = norm.batch_norm(x, stats, training=True)
    fn = jax.jit(lambda key: norm.noisy_batch_norm(x, stats, training=True, key=key,
                                                   noise_mean=a, noise_std=b)[0])  # fmt: skip
    means = []
    for step in range(3):
        key = jax.random.fold_in(jax.random.key(1), step)
        noise = np.asarray(fn(key) - clean, np.float64)
        m, s = norm.noise_moments(key, (features,), noise_mean=a, noise_std=b)
        # 5 standard errors of the sample mean and of the sample standard deviation.
        np.testing.assert_allclose(noise.mean(0), m, atol=5 * float(s.max()) / np.sqrt(batch))
        np.testing.assert_allclose(noise.std(0), s, atol=5 * float(s.max()) / np.sqrt(2 * batch))
        means.append(m)
    assert not np.allclose(means[0], means[1])  # a new distribution every step
    # The per-feature moments themselves: m ~ U(-a, a), s ~ U(0, b).
    keys = jax.random.split(jax.random.key(2), 1000)
    m, s = jax.vmap(lambda k: norm.noise_moments(k, (features,), noise_mean=a, noise_std=b))(keys)
    assert float(jnp.abs(m).max()) <= a and float(s.min()) >= 0 and float(s.max()) <= b
    np.testing.assert_allclose([m.mean(), m.var(), s.mean(), s.var()],
                               [0, a**2 / 3, b / 2, b**2 / 12], atol=0.05)  # fmt: skip


# --- population batch norm --------------------------------------------------------------------


def test_population_bn_matches_its_closed_form_over_steps():
    x = _normal(22, (3, 32, 2, 3), loc=1.0, scale=2.0)
    scale, bias, ct = _normal(23, (3,), 1.0), _normal(24, (3,)), _normal(25, (32, 2, 3))
    stats, m = _stats(26, 3), 0.6
    ref = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    fn = _value_and_grads(functools.partial(norm.population_batch_norm, training=True, momentum=m))
    for step in range(3):
        (y, stats), grads = fn(x[step], stats, scale, bias, ct)
        rstd = 1 / np.sqrt(ref["var"] + 1e-5)
        _close(y, (x[step] - ref["mean"]) * rstd * scale + bias)
        _close(grads[0], ct * rstd * scale)  # no gradient through the batch statistics
        _close(grads[1:], (np.sum(ct * (x[step] - ref["mean"]) * rstd, (0, 1)), ct.sum((0, 1))),
               atol=1e-4)  # fmt: skip
        xs = x[step].astype(np.float64)
        ref = {
            "mean": m * ref["mean"] + (1 - m) * xs.mean((0, 1)),
            "var": m * ref["var"] + (1 - m) * xs.var((0, 1)),
        }
        _close(stats, ref)
    _assert_no_gradient_to_the_running_statistics(
        functools.partial(norm.population_batch_norm, training=True), x[0], stats, ct
    )


# --- the variants with batch statistics on 8 devices ------------------------------------------

BATCH_VARIANTS = {
    "batch_norm": norm.batch_norm,
    "ghost": functools.partial(norm.ghost_batch_norm, virtual_batch_size=2),
    "renorm": functools.partial(norm.batch_renorm, r_max=1.5, d_max=0.3),
    "noisy": functools.partial(
        norm.noisy_batch_norm, key=jax.random.key(3), noise_mean=0.5, noise_std=1.0
    ),
    "population": norm.population_batch_norm,
    "stopgrad": norm.batch_norm_stopgrad,
}


@pytest.mark.parametrize("variant", sorted(BATCH_VARIANTS))
def test_on_8_devices_equals_the_global_batch(variant):
    devices = jax.device_count()
    shape = (devices * 4, 3, 2)
    x, ct = _normal(27, shape, loc=2.0, scale=3.0), _normal(28, shape)
    scale, bias, stats = _normal(29, (2,), 1.0), _normal(30, (2,)), _stats(31, 2)
    fn = functools.partial(BATCH_VARIANTS[variant], training=True, momentum=0.5)

    (y, new), grads = _value_and_grads(fn)(x, stats, scale, bias, ct)
    split = lambda a: a.reshape((devices, -1) + a.shape[1:])  # noqa: E731
    on_devices = jax.pmap(
        _loss_grads(functools.partial(fn, axis_name=AXIS)), AXIS, in_axes=(0, None, None, None, 0)
    )
    (y_d, new_d), grads_d = on_devices(split(x), stats, scale, bias, split(ct))
    _close(np.asarray(y_d).reshape(shape), y)
    _close(new_d, jax.tree.map(lambda s: np.broadcast_to(s, (devices,) + s.shape), new))
    _close(np.asarray(grads_d[0]).reshape(shape), grads[0], atol=1e-4)
    # Each device differentiates its own loss: the global gradient is their sum.
    _close((grads_d[1].sum(0), grads_d[2].sum(0)), grads[1:], atol=1e-4)


# --- layer and group normalization ------------------------------------------------------------


def _stateless(fn):
    """`fn(x, scale, bias) -> y` in the signature of `_value_and_grads`."""
    return _value_and_grads(lambda x, stats, scale, bias: (fn(x, scale, bias), stats))


def _flax(module):
    return lambda x, scale, bias: module.apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize(
    "shape, groups", [((4, 5, 6, 8), 4), ((4, 5, 6, 8), 8), ((6, 100), 10), ((6, 100), 1)]
)
def test_group_norm_equals_flax(shape, groups):
    x, ct = _normal(32, shape, loc=3.0, scale=2.0), _normal(33, shape)
    scale, bias = _normal(34, shape[-1:], 1.0), _normal(35, shape[-1:])
    args = (x, {}, scale, bias, ct)
    got = _stateless(functools.partial(norm.group_norm, num_groups=groups))(*args)
    flax_gn = fnn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
    _close(got, _stateless(_flax(flax_gn))(*args), atol=1e-4)


@pytest.mark.parametrize("shape, axis", [((4, 5, 6, 8), -1), ((6, 100), -1), ((4, 8, 5, 6), 1)])
def test_layer_norm_equals_flax(shape, axis):
    x, ct = _normal(36, shape, loc=-2.0, scale=3.0), _normal(37, shape)
    scale, bias = _normal(38, (shape[axis],), 1.0), _normal(39, (shape[axis],))
    args = (x, {}, scale, bias, ct)
    got = _stateless(functools.partial(norm.layer_norm, axis=axis))(*args)
    flax_ln = fnn.LayerNorm(
        epsilon=1e-5,
        reduction_axes=tuple(range(1, len(shape))),
        feature_axes=axis,
        use_fast_variance=False,
    )
    _close(got, _stateless(_flax(flax_ln))(*args), atol=1e-4)


def test_group_norm_refuses_a_group_count_that_does_not_divide_the_channels():
    with pytest.raises(ValueError, match="num_groups=3 does not divide the 8 channels"):
        norm.group_norm(jnp.ones((2, 8)), num_groups=3)
    with pytest.raises(ValueError, match="not the batch axis"):
        norm.group_norm(jnp.ones((2, 8)), num_groups=2, axis=0)


# --- the layers -------------------------------------------------------------------------------


def _init_apply(layer, x, train=True, **rngs):
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    y, new = layer.apply(variables, x, use_running_average=not train, mutable=["batch_stats"],
                         rngs=rngs)  # fmt: skip
    return variables, y, new


@pytest.mark.parametrize(
    "layer, flax_layer",
    [
        (layers.LayerNorm(), fnn.LayerNorm(reduction_axes=(1, 2, 3), use_fast_variance=False)),
        (layers.GroupNorm(num_groups=2), fnn.GroupNorm(num_groups=2, use_fast_variance=False)),
        (layers.GroupNorm(), fnn.GroupNorm(num_groups=8, use_fast_variance=False)),  # clipped
        (
            layers.BatchNorm(use_scale=False, use_bias=False),
            fnn.BatchNorm(use_scale=False, use_bias=False, use_fast_variance=False),
        ),  # fmt: skip
    ],
)
def test_layers_have_flax_variables_and_outputs(layer, flax_layer):
    x = _normal(40, (4, 3, 3, 8), loc=1.0, scale=2.0)
    variables, y, new = _init_apply(layer, x)
    kw = {"use_running_average": False} if isinstance(flax_layer, fnn.BatchNorm) else {}
    flax_vars = flax_layer.init(jax.random.key(0), x, **kw)
    flax_y, flax_new = flax_layer.apply(flax_vars, x, mutable=["batch_stats"], **kw)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_vars)
    _close(y, flax_y, atol=1e-4)
    _close(new, flax_new)


def test_renorm_layer_keeps_a_step_counter_and_relaxes_on_schedule():
    kw = dict(r_max=2.0, d_max=1.0, warmup_steps=1, r_max_steps=2, d_max_steps=4)
    layer = layers.BatchRenorm(momentum=0.5, **kw)
    x = _normal(41, (4, 16, 3), loc=3.0, scale=2.0)
    variables = layer.init(jax.random.key(0), x[0], use_running_average=True)
    assert variables["batch_stats"]["steps"].dtype == jnp.float32
    stats = variables["batch_stats"]
    for step in range(4):
        y, new = layer.apply({**variables, "batch_stats": stats}, x[step],
                             use_running_average=False, mutable=["batch_stats"])  # fmt: skip
        r_max, d_max = norm.renorm_schedule(step, **kw)
        want_y, want_stats = norm.batch_renorm(
            x[step], {"mean": stats["mean"], "var": stats["var"]}, training=True,
            r_max=r_max, d_max=d_max, momentum=0.5,
        )  # fmt: skip
        _close(y, want_y, 0, 0)
        stats = new["batch_stats"]
        assert float(stats["steps"]) == step + 1
        _close({"mean": stats["mean"], "var": stats["var"]}, want_stats, 0, 0)
    evaluated, after = layer.apply({**variables, "batch_stats": stats}, x[0],
                                   use_running_average=True, mutable=["batch_stats"])  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], stats)


def test_noisy_layer_draws_from_the_noise_stream_and_says_when_it_is_missing():
    layer = layers.NoisyBatchNorm(noise_mean=0.5, noise_std=1.0)
    x = _normal(42, (8, 4))
    _, y1, _ = _init_apply(layer, x, noise=jax.random.key(1))
    _, y1_again, _ = _init_apply(layer, x, noise=jax.random.key(1))
    _, y2, _ = _init_apply(layer, x, noise=jax.random.key(2))
    np.testing.assert_array_equal(y1, y1_again)
    assert not np.allclose(y1, y2)
    _, y_eval, _ = _init_apply(layer, x, train=False)
    _, bn_eval, _ = _init_apply(layers.BatchNorm(), x, train=False)
    np.testing.assert_array_equal(y_eval, bn_eval)
    with pytest.raises(ValueError, match=r"rngs=\{'noise': key\}"):
        _init_apply(layer, x)


def test_variants_other_than_batchnorm_refuse_a_mask():
    with pytest.raises(ValueError, match="mask is supported by BatchNorm only"):
        layers.GhostBatchNorm(virtual_batch_size=2).init(
            jax.random.key(0), jnp.ones((4, 3)), use_running_average=False, mask=jnp.ones(4)
        )


# --- integer inputs: promoted to float32, as flax's normalizations promote them ---------------

INT_DTYPES = (np.int32, np.uint8, np.bool_)
INT_SHAPE = (8, 2, 2, 4)


def _int_input(dtype):
    """Integers spread unlike N(0, 1) per feature: truncation back to them would show."""
    values = np.random.default_rng(50).integers(0, 200, INT_SHAPE) * np.arange(1, 5)
    return jnp.asarray(values % 256 if dtype == np.uint8 else values, dtype)


def _flax_bn(x, stats, scale, bias, *, training=True):
    """`(y, new_stats)` of `flax.linen.BatchNorm` with these variables."""
    layer = fnn.BatchNorm(use_running_average=not training, use_fast_variance=False)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    y, new = layer.apply(variables, x, mutable=["batch_stats"])
    return y, new["batch_stats"]


def _flax_example_norm(module):
    return lambda x, stats, scale, bias: (_flax(module)(x, scale, bias), stats)


def _no_stats(fn):
    return lambda x, stats, scale, bias: (fn(x, scale, bias), stats)


# Each function of bnlab.norm in a setting where flax has its exact equal.
INT_CASES = {
    "batch_norm": (functools.partial(norm.batch_norm, training=True), _flax_bn),
    "batch_norm-eval": (
        functools.partial(norm.batch_norm, training=False),
        functools.partial(_flax_bn, training=False),
    ),
    "ghost_batch_norm": (
        functools.partial(norm.ghost_batch_norm, training=True, virtual_batch_size=INT_SHAPE[0]),
        _flax_bn,
    ),
    "batch_renorm": (
        functools.partial(norm.batch_renorm, training=True, r_max=1.0, d_max=0.0),
        _flax_bn,
    ),
    "noisy_batch_norm": (
        functools.partial(
            norm.noisy_batch_norm, training=True, key=jax.random.key(0), noise_mean=0, noise_std=0
        ),
        _flax_bn,
    ),
    "population_batch_norm": (
        lambda x, stats, scale, bias: (
            norm.population_batch_norm(x, stats, scale, bias, training=True)[0],
            norm.population_batch_norm(x, stats, scale, bias, training=False)[1],
        ),
        functools.partial(_flax_bn, training=False),
    ),
    "batch_norm_stopgrad": (functools.partial(norm.batch_norm_stopgrad, training=True), _flax_bn),
    "layer_norm": (
        _no_stats(norm.layer_norm),
        _flax_example_norm(fnn.LayerNorm(reduction_axes=(1, 2, 3), use_fast_variance=False)),
    ),
    "group_norm": (
        _no_stats(functools.partial(norm.group_norm, num_groups=2)),
        _flax_example_norm(fnn.GroupNorm(num_groups=2, use_fast_variance=False)),
    ),
}


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("name", INT_CASES)
def test_every_normalization_promotes_integer_inputs_as_flax(name, dtype):
    ours, theirs = INT_CASES[name]
    x = _int_input(dtype)
    args = (_stats(51, 4), _normal(52, (4,), 1.0), _normal(53, (4,)))
    y, new_stats = ours(x, *args)
    want_y, want_stats = theirs(x, *args)
    assert y.dtype == want_y.dtype == jnp.float32
    _close((y, new_stats), (want_y, want_stats), rtol=1e-4, atol=1e-4)
    float_y, _ = ours(x.astype(jnp.float32), *args)
    np.testing.assert_array_equal(y, float_y)  # the same as for the float32 of the input


@pytest.mark.parametrize("name", sorted(set(norms.NORMS) - {"none"}))
def test_every_layer_promotes_integer_inputs_as_flax(name):
    """Each registered linen layer: float32 out of an integer input, as `flax.linen.BatchNorm`
    gives, with the values and statistics of the same input as float32."""
    overrides = {"model.norm": name, "norm.virtual_batch_size": "4", "norm.num_groups": "2"}
    cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
    if norms.build(cfg) is layers.Identity:
        pytest.skip(f"{name} normalizes kernels only: its output layer is the identity, which "
                    "passes an integer input through, as model.norm=none does")  # fmt: skip
    layer, x = norms.build(cfg)(), _int_input(np.int32)
    variables = layer.init(jax.random.key(0), x.astype(jnp.float32), use_running_average=True)

    def train(x):
        return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                           rngs={"noise": jax.random.key(1)})  # fmt: skip

    y, new = train(x)
    flax_y = _flax_bn(x, _stats(51, 4), jnp.ones(4), jnp.zeros(4))[0]
    assert y.dtype == flax_y.dtype == jnp.float32
    _close((y, new), train(x.astype(jnp.float32)), 0, 0)

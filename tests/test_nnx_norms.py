"""Tests of the NNX layers of every registered normalization (`bnlab.nnx`), the registry's NNX
hook, and the NNX models built from a config, against their linen twins and flax's layers."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bnlab import config, norms, schema
from bnlab import nnx as bnx
from bnlab.nn import nnx_models
from bnlab.training import train

NAMES = sorted(norms.NORMS)
SHAPE = (4, 3, 3, 8)  # a batch of 4 (2 virtual batches of 2), 8 channels (4 groups of 2)
# Small groups and virtual batches for these shapes, and a renorm schedule that moves within
# the three steps of the tests (plain BN, then r_max and d_max relaxing).
OVERRIDES = {
    "norm.momentum": "0.5",
    "norm.num_groups": "4",
    "norm.virtual_batch_size": "2",
    "norm.r_max": "1.5",
    "norm.d_max": "0.5",
    "norm.renorm_warmup_steps": "1",
    "norm.r_max_steps": "1",
    "norm.d_max_steps": "2",
}


def _config(name, model="cnn"):
    overrides = {**OVERRIDES, "model.norm": name, "model.name": model}
    return config.validate(config.apply_overrides(config.default_config(), overrides))


def _normal(seed, shape, loc=0.0, scale=1.0):
    values = loc + scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(values, jnp.float32)


def _assert_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


def _randomized(variables, seed):
    """Random values of the shapes of `variables` (arrays or shapes): scale and var in
    [0.5, 2], kernels scaled by their fan-in, renorm's step count 0, the rest normal."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            values = rng.uniform(0.5, 2.0, leaf.shape)
        elif name == "kernel":
            values = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            values = np.zeros(leaf.shape) if name == "steps" else rng.standard_normal(leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def _spec(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _linen_shapes(module, x, **kwargs):
    """The variables that linen's `module.init` declares, as shapes (nothing is computed)."""
    return _spec(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), x))


def _twins(name):
    """The NNX layer of `name` with random variables, its linen twin, and those variables as
    linen's dict."""
    cfg = _config(name)
    layer = bnx.norm_from_config(cfg, SHAPE[-1], rngs=nnx.Rngs(0))
    variables = _randomized(bnx.to_linen(layer), 1)
    bnx.from_linen(layer, variables)
    return norms.build(cfg)(), variables, layer


def _linen_step(linen, variables, x, ct, noise):
    """Output, gradients (params, x) and variables after one training call of a linen layer."""

    def loss(params, x):
        y, updates = linen.apply(
            {**variables, "params": params}, x, use_running_average=False,
            mutable=["batch_stats"], rngs={"noise": noise},
        )  # fmt: skip
        return jnp.sum(y * ct), (y, updates)

    grads, (y, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        variables.get("params", {}), x
    )
    return y, grads, {**variables, **updates}


def _nnx_step(layer, x, ct, noise):
    """The same for the NNX layer (its variables updated in place), noise keyed as linen's."""

    def loss(layer, x):
        y = layer(x, rngs=bnx.linen_rng(noise))
        return jnp.sum(y * ct), y

    (dparams, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, (nnx.to_pure_dict(dparams), dx)


# --- each layer against its linen twin ---------------------------------------------------------


def test_every_builtin_normalization_has_an_nnx_layer():
    builtin = {"batchnorm", "none", "batchnorm_noaffine", "ghost_batchnorm", "batch_renorm",
               "noisy_batchnorm", "population_batchnorm", "population_batchnorm_data",
               "batchnorm_stopgrad", "layernorm",
               "groupnorm", "weightnorm", "ws_groupnorm"}  # fmt: skip
    assert set(NAMES) == builtin
    assert all(norms.get(name).nnx is not None for name in NAMES)
    # The normalizations of weights also have NNX modules for the kernels.
    on_kernel = {name for name in NAMES if norms.get(name).on_kernel}
    assert on_kernel == {"weightnorm", "ws_groupnorm"}
    assert all(norms.get(name).nnx_kernel is not None for name in on_kernel)


@pytest.mark.parametrize("name", NAMES)
def test_layer_equals_its_linen_twin_over_training_steps_and_evaluation(name):
    linen, variables, layer = _twins(name)
    # The map is one-to-one: linen declares exactly the NNX layer's variables.
    assert _linen_shapes(linen, _normal(0, SHAPE), use_running_average=True) == _spec(variables)
    ct = _normal(2, SHAPE)
    for step in range(3):
        x = _normal(10 + step, SHAPE, loc=step - 1.0, scale=1.0 + step)
        noise = jax.random.key(20 + step)
        y_ref, grads_ref, variables = _linen_step(linen, variables, x, ct, noise)
        y, grads = _nnx_step(layer, x, ct, noise)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        _assert_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
        _assert_close(bnx.to_linen(layer), variables, rtol=1e-5, atol=1e-6)
    layer.eval()
    before = jax.tree.map(jnp.copy, bnx.to_linen(layer))
    x = _normal(30, SHAPE, loc=0.5)
    y_ref = linen.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, bnx.to_linen(layer), before)


def test_batch_renorm_counts_its_training_steps_as_linen_does():
    _, _, layer = _twins("batch_renorm")
    assert "steps" in bnx.to_linen(layer)["batch_stats"]
    for _ in range(3):
        layer(_normal(3, SHAPE))
    layer(_normal(3, SHAPE), use_running_average=True)  # evaluation does not count
    assert layer.steps[...] == 3 and layer.steps[...].dtype == jnp.float32


def test_noisy_batchnorm_draws_from_the_noise_stream():
    x = _normal(4, SHAPE, loc=1.0)
    make = lambda: bnx.NoisyBatchNorm(8, noise_mean=0.5, noise_std=1.0, rngs=nnx.Rngs(0))
    plain = bnx.BatchNorm(8, rngs=nnx.Rngs(0))
    layer = make()
    y1 = layer(x, rngs=jax.random.key(1))
    assert not np.allclose(y1, plain(x), atol=1e-2)  # the noise is there
    np.testing.assert_array_equal(make()(x, rngs=jax.random.key(1)), y1)  # a key, as it is
    rngs = nnx.Rngs(noise=7)
    first, second = make()(x, rngs=rngs), make()(x, rngs=rngs)  # the stream advances
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, make()(x, rngs=nnx.Rngs(noise=7).noise()))
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        make()(x)
    layer.eval()
    plain.eval()
    nnx.update(plain, nnx.state(layer))
    np.testing.assert_array_equal(layer(x), plain(x))  # evaluation: BN's, no key needed


@pytest.mark.parametrize("name", ["ghost_batchnorm", "batch_renorm", "noisy_batchnorm"])
def test_variants_refuse_a_mask(name):
    _, _, layer = _twins(name)
    with pytest.raises(ValueError, match="mask is supported by BatchNorm only"):
        layer(_normal(5, SHAPE), mask=jnp.ones(SHAPE[0]), rngs=jax.random.key(0))


# --- LayerNorm and GroupNorm against flax's ---------------------------------------------------


def _flax_twin(ours_cls, theirs_cls, **kw):
    ours = ours_cls(8, epsilon=1e-3, rngs=nnx.Rngs(0), **kw)
    theirs_kw = {k: v for k, v in kw.items() if k != "feature_axes"}
    if theirs_cls is nnx.LayerNorm:
        theirs_kw["reduction_axes"] = (1, 2, 3)  # bnlab: every non-batch axis
    theirs = theirs_cls(8, epsilon=1e-3, use_fast_variance=False, rngs=nnx.Rngs(0), **theirs_kw)
    return ours, theirs


@pytest.mark.parametrize(
    "ours_cls,theirs_cls,kw",
    [
        (bnx.LayerNorm, nnx.LayerNorm, {}),
        (bnx.GroupNorm, nnx.GroupNorm, {"num_groups": 4}),
        (bnx.GroupNorm, nnx.GroupNorm, {"num_groups": None, "group_size": 8}),
        (bnx.GroupNorm, nnx.GroupNorm, {"num_groups": 8, "use_bias": False}),
    ],
    ids=["layernorm", "groupnorm", "groupnorm-group_size", "groupnorm-no-bias"],
)
def test_layernorm_and_groupnorm_match_flax(ours_cls, theirs_cls, kw):
    ours, theirs = _flax_twin(ours_cls, theirs_cls, **kw)
    is_variable = lambda v: isinstance(v, nnx.Variable)
    kind = lambda m: jax.tree.map(
        lambda v: (type(v), v.shape, v.dtype), nnx.state(m), is_leaf=is_variable
    )
    assert kind(ours) == kind(theirs)  # names, types, shapes, dtypes
    rng = np.random.default_rng(6)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), nnx.state(theirs)
    )
    nnx.update(theirs, state)
    nnx.update(ours, nnx.state(theirs))  # flax's state into bnlab's layer, unchanged
    x, ct = _normal(7, SHAPE, loc=3.0, scale=2.0), _normal(8, SHAPE)
    loss = lambda m, x: jnp.sum(m(x) * ct)
    (g_ref, dx_ref), (g, dx) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (theirs, ours))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    _assert_close(nnx.to_pure_dict(g), nnx.to_pure_dict(g_ref), rtol=1e-4, atol=1e-4)


def test_groupnorm_constructor_errors_say_what_to_choose():
    with pytest.raises(ValueError, match="not both"):
        bnx.GroupNorm(8, 4, group_size=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="choose a divisor of 12"):
        bnx.GroupNorm(12, 5, rngs=nnx.Rngs(0))
    # As the linen layer: fewer channels than groups, one group per channel.
    assert bnx.GroupNorm(6, 32, rngs=nnx.Rngs(0)).num_groups == 6


# --- the registry hook and the models built from a config -------------------------------------


def _random_model(cfg):
    """The NNX model of `cfg` with random variables, and those as linen's dict. Built from
    shapes: initializing eagerly would compile every initializer, op by op."""
    model = nnx.eval_shape(lambda: nnx_models.build_model(cfg, rngs=nnx.Rngs(0)))
    variables = _randomized(bnx.to_linen(model), 4)
    bnx.from_linen(model, variables)
    return model, variables


# The MLP's dense layers are NNX's own `Linear` under a kernel normalization: those too.
MODEL_CASES = [(name, "cnn") for name in NAMES] + [("batchnorm", "mlp")]
MODEL_CASES += [(name, "mlp") for name in NAMES if norms.get(name).on_kernel]


@pytest.mark.parametrize("name,model_name", MODEL_CASES)
def test_nnx_model_from_config_equals_the_linen_model(name, model_name):
    """Through the variable map, a training step (outputs, statistics) and evaluation; the
    layers' gradients are compared above. The CNN with every normalization, the MLP with BN
    (its blocks are the CNN's) and with the normalizations of weights."""
    x, noise = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1)), jax.random.key(3)
    cfg = _config(name, model_name)
    linen = train.build_model(cfg)
    model, variables = _random_model(cfg)
    assert _linen_shapes(linen, x, train=False) == _spec(variables)  # the same paths
    y_ref, updates = linen.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"noise": noise}
    )
    np.testing.assert_allclose(model(x, rngs=noise), y_ref, rtol=1e-5, atol=1e-5)
    trained = {**variables, **updates}
    _assert_close(bnx.to_linen(model), trained, rtol=1e-5, atol=1e-6)
    model.eval()
    y_ref = linen.apply(trained, x, train=False)
    np.testing.assert_allclose(model(x), y_ref, rtol=1e-5, atol=1e-5)


def test_a_normalization_without_an_nnx_layer_is_a_config_error():
    spec = norms.get("batchnorm")
    norms.register_norm("linen_only", norms.NormSpec(layer=spec.layer, batch_stats=True))
    try:
        cfg = _config("linen_only")
        where = r"'linen_only' \(registered at .*test_nnx_norms.py:\d+\) has no NNX layer"
        with pytest.raises(schema.ConfigError, match=where):
            bnx.norm_from_config(cfg, 8, rngs=nnx.Rngs(0))
        with pytest.raises(schema.ConfigError, match="has no NNX layer"):
            nnx_models.build_model(cfg, rngs=nnx.Rngs(0))
        train.build_model(cfg)  # the linen model is fine
    finally:
        norms.unregister_norm("linen_only")
    with pytest.raises(schema.ConfigError, match="not one of"):
        bnx.norm_from_config(_config("batchnorm").norm, 8, rngs=nnx.Rngs(0), name="nope")


def test_norm_from_config_takes_the_norm_group_with_a_name_and_passes_the_axis():
    cfg = _config("ghost_batchnorm")
    layer = bnx.norm_from_config(
        cfg.norm, 8, rngs=nnx.Rngs(0), name="ghost_batchnorm", axis={"axis_name": "batch"}
    )
    assert isinstance(layer, bnx.GhostBatchNorm)
    assert (layer.virtual_batch_size, layer.momentum, layer.axis_name) == (2, 0.5, "batch")
    groups = bnx.norm_from_config(
        _config("groupnorm"), 8, rngs=nnx.Rngs(0), axis={"axis_name": "batch"}
    )
    assert (type(groups), groups.num_groups) == (bnx.GroupNorm, 4)  # no axis: no batch statistics
    with pytest.raises(TypeError, match="name="):
        bnx.norm_from_config(cfg.norm, 8, rngs=nnx.Rngs(0))


def test_build_model_refuses_dropout():
    cfg = config.validate(config.apply_overrides(config.default_config(), {"model.dropout": "0.1"}))
    with pytest.raises(schema.ConfigError, match="model.dropout=0.1"):
        nnx_models.build_model(cfg, rngs=nnx.Rngs(0))


def test_nnx_jit_step_with_a_noise_stream_traces_once_and_draws_new_noise():
    norm = bnx.norm_factory(_config("noisy_batchnorm"))
    model = nnx_models.MLP(norm=norm, hidden=(8,), image_shape=(6,), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    rngs = nnx.Rngs(noise=3)
    x, labels = _normal(9, (8, 6)), jnp.arange(8) % 10
    traces = []

    @nnx.jit
    def step(model, optimizer, rngs, x, labels):
        traces.append(1)
        loss = lambda model, rngs: train.cross_entropy(model(x, rngs=rngs), labels)
        value, grads = nnx.value_and_grad(loss)(model, rngs)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer, rngs, x, labels)) for _ in range(3)]
    assert len(traces) == 1 and all(np.isfinite(losses))
    assert rngs.noise.count[...] == 3  # one draw per step: new noise every step


def test_importing_the_registry_does_not_import_flax_nnx():
    code = "import sys, bnlab, bnlab.norms, bnlab.training.train; print('flax.nnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- integer inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_integer_inputs_are_promoted_as_flax_promotes_them(name):
    """Each NNX layer gives float32 for an int32 input (as `flax.nnx.BatchNorm` does), equal
    to its output for the same input as float32, running statistics included."""
    _, _, layer = _twins(name)
    if isinstance(layer, bnx.Identity):
        pytest.skip(f"{name} normalizes kernels only: its output layer is the identity, which "
                    "passes an integer input through, as model.norm=none does")  # fmt: skip
    twin = nnx.clone(layer)
    values = np.random.default_rng(9).integers(0, 200, SHAPE) * np.arange(1, 9)
    x = jnp.asarray(values, jnp.int32)
    y, y_float = layer(x, rngs=jax.random.key(3)), twin(x.astype(float), rngs=jax.random.key(3))
    flax_y = nnx.BatchNorm(SHAPE[-1], use_running_average=False, rngs=nnx.Rngs(0))(x)
    assert y.dtype == flax_y.dtype == jnp.float32
    np.testing.assert_array_equal(y, y_float)
    _assert_close(nnx.to_pure_dict(nnx.state(layer)), nnx.to_pure_dict(nnx.state(twin)), rtol=0)


@pytest.mark.parametrize(
    "ours_cls, theirs_cls, kw",
    [
        (bnx.BatchNorm, nnx.BatchNorm, {"use_running_average": False}),
        (bnx.LayerNorm, nnx.LayerNorm, {"reduction_axes": (1, 2, 3)}),
        (bnx.GroupNorm, nnx.GroupNorm, {"num_groups": 4}),
    ],
    ids=["batchnorm", "layernorm", "groupnorm"],
)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8])
def test_integer_inputs_give_flax_values(ours_cls, theirs_cls, kw, dtype):
    ours_kw = {k: v for k, v in kw.items() if k != "reduction_axes"}  # bnlab: every non-batch
    ours = ours_cls(8, **ours_kw, rngs=nnx.Rngs(0))
    theirs = theirs_cls(8, **kw, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(10).integers(0, 250, SHAPE), dtype)
    y, want = ours(x), theirs(x)
    assert y.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    _assert_close(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs)),
                  rtol=1e-5, atol=1e-5)  # fmt: skip


LAYERS = (
    bnx.BatchNorm,
    bnx.GhostBatchNorm,
    bnx.BatchRenorm,
    bnx.NoisyBatchNorm,
    bnx.PopulationBatchNorm,
    bnx.BatchNormStopGrad,
    bnx.LayerNorm,
    bnx.GroupNorm,
)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
def test_num_features_must_be_a_positive_int_and_the_error_says_so(layer):
    for bad, error in [(6.0, TypeError), ("8", TypeError), (True, TypeError), (0, ValueError)]:
        with pytest.raises(error, match=f"{layer.__name__}: num_features must be a positive int"):
            layer(bad, rngs=nnx.Rngs(0))
    assert layer(np.int64(8), rngs=nnx.Rngs(0)).scale[...].shape == (8,)  # any integer type
    with pytest.raises(TypeError):  # flax's refuses a float too (without saying why)
        nnx.BatchNorm(6.0, rngs=nnx.Rngs(0))


def test_batchnorm_takes_a_tuple_of_feature_sizes_but_no_empty_axis():
    assert bnx.BatchNorm((2, 4), axis=(-2, -1), rngs=nnx.Rngs(0)).num_features == (2, 4)
    with pytest.raises(ValueError, match=r"one per feature axis\); got \(2, 0\)"):
        bnx.BatchNorm((2, 0), axis=(-2, -1), rngs=nnx.Rngs(0))

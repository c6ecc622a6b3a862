"""Tests of `bnlab.nnx` against `flax.nnx.BatchNorm`, and of the NNX <-> linen state map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors, nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bnlab import layers, models
from bnlab import nnx as bnx
from bnlab.nn import nnx_models

AXIS = "batch"  # the one named axis of these tests


def _normal(seed, shape, loc=0.0, scale=1.0):
    return jnp.asarray(
        loc + scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32
    )


def _flax_bn(num_features, **kw):
    return nnx.BatchNorm(num_features, use_fast_variance=False, **kw)


def _randomize(layers_, seed):
    """The same random scale, bias and statistics (positive var) in every layer of `layers_`."""
    rng = np.random.default_rng(seed)
    state = nnx.state(layers_[0])

    def draw(path, leaf):
        low = path[-2].key in ("var", "scale")  # [..., name, "value"]
        values = rng.uniform(0.5, 2.0, leaf.shape) if low else rng.standard_normal(leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    state = jax.tree_util.tree_map_with_path(draw, state)
    for layer in layers_:
        nnx.update(layer, state)


def _assert_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


def _pure(module, *filters):
    return nnx.to_pure_dict(nnx.state(module, *filters))


# --- the layer against flax.nnx.BatchNorm ------------------------------------------------------


@pytest.mark.parametrize(
    "num_features,use_scale,use_bias,param_dtype",
    [(5, True, True, jnp.float32), (3, False, True, jnp.float32), (4, True, False, jnp.bfloat16)],
)
def test_state_has_flax_names_shapes_dtypes_and_types(
    num_features, use_scale, use_bias, param_dtype
):
    kw = dict(use_scale=use_scale, use_bias=use_bias, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    theirs, ours = _flax_bn(num_features, **kw), bnx.BatchNorm(num_features, **kw)
    spec = lambda m: jax.tree.map(
        lambda v: (type(v), v.shape, v.dtype),
        nnx.state(m),
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    assert spec(ours) == spec(theirs)
    np.testing.assert_array_equal(ours.mean[...], np.zeros(num_features, np.float32))
    np.testing.assert_array_equal(ours.var[...], np.ones(num_features, np.float32))
    # State moves between the two unchanged, both ways.
    _randomize([theirs], 1)
    nnx.update(ours, nnx.state(theirs))
    _assert_close(_pure(ours), _pure(theirs), rtol=0, atol=0)


STEP_CASES = [
    pytest.param((16, 4), -1, 0.9, None, id="2d"),
    pytest.param((4, 3, 5), 1, 0.5, None, id="3d-axis1"),
    pytest.param((2, 5, 4, 6), -1, 0.0, None, id="4d"),
    pytest.param((12, 4), -1, 0.8, np.arange(12)[:, None] % 3 != 0, id="2d-mask"),
]


@pytest.mark.parametrize("shape,axis,momentum,mask", STEP_CASES)
def test_training_and_evaluation_match_flax_over_steps(shape, axis, momentum, mask):
    features = shape[axis]
    kw = dict(axis=axis, momentum=momentum, epsilon=1e-3, rngs=nnx.Rngs(0))
    theirs, ours = _flax_bn(features, **kw), bnx.BatchNorm(features, **kw)
    _randomize([theirs, ours], 2)
    # bnlab gives padding (mask 0) the output of a real example and no gradient, flax normalizes
    # it as it is: only the real rows' outputs and a loss over them are comparable.
    real = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    ct = _normal(3, shape) * real

    def loss(layer, x):
        return jnp.sum(layer(x, mask=mask) * ct)

    for step in range(3):
        x = _normal(10 + step, shape, loc=step - 1.0, scale=1.0 + step)
        (dx_ref, g_ref), (dx, g) = (
            nnx.grad(loss, argnums=(1, 0))(layer, x) for layer in (theirs, ours)
        )
        y, y_ref = ours(x, mask=mask), theirs(x, mask=mask)
        np.testing.assert_allclose(y[real], y_ref[real], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        _assert_close(nnx.to_pure_dict(g), nnx.to_pure_dict(g_ref), rtol=1e-4, atol=1e-5)
        # Each training call above stepped both layers' statistics the same way.
        _assert_close(
            _pure(ours, nnx.BatchStat), _pure(theirs, nnx.BatchStat), rtol=1e-5, atol=1e-6
        )

    before = _pure(ours, nnx.BatchStat)
    for layer in (theirs, ours):
        layer.eval()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, _pure(ours, nnx.BatchStat), before)


def test_bf16_input_gives_bf16_output_and_float32_statistics():
    x = _normal(4, (16, 3), loc=2.0).astype(jnp.bfloat16)
    layer = bnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    assert layer(x).dtype == jnp.bfloat16
    assert layer.mean[...].dtype == layer.var[...].dtype == jnp.float32
    assert bnx.BatchNorm(3, dtype=jnp.float32, rngs=nnx.Rngs(0))(x).dtype == jnp.float32
    reference = bnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    reference(x.astype(jnp.float32))  # statistics are float32 reductions of the same values
    _assert_close(_pure(layer, nnx.BatchStat), _pure(reference, nnx.BatchStat), rtol=1e-6)


def test_convention_and_backward_reach_the_pure_function():
    x = _normal(5, (6, 3), loc=1.0, scale=2.0)
    torch_like = bnx.BatchNorm(3, momentum=0.0, convention="torch", rngs=nnx.Rngs(0))
    torch_like(x)
    np.testing.assert_allclose(torch_like.var[...], np.var(np.asarray(x), 0, ddof=1), rtol=1e-5)
    grads = {}
    for backward in ("analytic", "autodiff"):
        layer = bnx.BatchNorm(3, backward=backward, rngs=nnx.Rngs(0))
        grads[backward] = nnx.grad(lambda m, x: jnp.sum(m(x) ** 3), argnums=1)(layer, x)
    np.testing.assert_allclose(grads["analytic"], grads["autodiff"], rtol=1e-4, atol=1e-5)


class Net(nnx.Module):
    """Dense, normalization, relu, dense: a small model for the transform patterns."""

    def __init__(self, norm=bnx.BatchNorm, *, rngs):
        self.dense = nnx.Linear(6, 8, rngs=rngs)
        self.norm = norm(8, momentum=0.8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.dense(x))))


def test_train_and_eval_switches_as_in_flax():
    x = _normal(6, (8, 6), loc=1.0)
    model = Net(rngs=nnx.Rngs(0))
    assert model.norm.use_running_average is False  # flax's default: training
    model.eval()
    assert model.norm.use_running_average is True
    before = _pure(model, nnx.BatchStat)
    y_eval = model(x)
    jax.tree.map(np.testing.assert_array_equal, _pure(model, nnx.BatchStat), before)
    # nnx.view: another mode over the same variables; training through it updates the model's.
    training = nnx.view(model, use_running_average=False)
    assert training.norm.use_running_average is False and model.norm.use_running_average is True
    y_train = training(x)
    assert not np.allclose(model.norm.mean[...], before["norm"]["mean"])
    assert not np.allclose(y_train, y_eval)
    # The call's argument overrides the attribute for that call only.
    h = model.dense(x)
    np.testing.assert_array_equal(model.norm(h, use_running_average=False), training.norm(h))
    assert model.norm.use_running_average is True
    model.train()
    assert model.norm.use_running_average is False
    unset = bnx.BatchNorm(8, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nnx.view"):
        unset(jnp.ones((4, 8)))
    assert "use_running_average" in nnx.view_info(model)


# --- the transform patterns that flax users report broken with BN -----------------------------


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batches(seed, steps, batch=16):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((steps, batch, 6)) + 0.5, jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, (steps, batch)), jnp.int32)
    return xs, ys


TX = optax.sgd(0.1, momentum=0.9)


def _train_eagerly(model, xs, ys):
    """The stateful NNX loop, step by step: the reference for the transformed ones."""
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    for x, y in zip(xs, ys, strict=True):
        optimizer.update(model, nnx.grad(_loss)(model, x, y))
    return model


def _split_with_optimizer(model):
    return nnx.split((model, nnx.Optimizer(model, TX, wrt=nnx.Param)))


def _guide_step(graphdef, state, batch):
    """One training step as flax's performance guide writes it for jax transforms: merge the
    pure state, step with NNX's API, return the new pure state."""
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, nnx.grad(_loss)(model, *batch))
    return nnx.state((model, optimizer))


def test_split_merge_around_jax_jit_equals_eager_and_traces_once():
    xs, ys = _batches(7, 3)
    graphdef, state = _split_with_optimizer(Net(rngs=nnx.Rngs(0)))
    traces = []

    @jax.jit
    def train_step(state, x, y):
        traces.append(1)  # runs only while tracing
        return _guide_step(graphdef, state, (x, y))

    for x, y in zip(xs, ys, strict=True):
        state = train_step(state, x, y)
    assert len(traces) == 1
    model, _ = nnx.merge(graphdef, state)
    reference = _train_eagerly(Net(rngs=nnx.Rngs(0)), xs, ys)
    _assert_close(_pure(model), _pure(reference), rtol=1e-5, atol=1e-6)


def test_lax_scan_over_steps_and_jax_vmap_over_models():
    """flax's performance guide: split once, scan the steps, vmap a batch of models."""
    seeds = (0, 1, 2)
    xs, ys = _batches(8, 3)
    graphdef, _ = _split_with_optimizer(Net(rngs=nnx.Rngs(0)))

    def train(key):
        _, state = _split_with_optimizer(Net(rngs=nnx.Rngs(params=key)))
        step = lambda state, batch: (_guide_step(graphdef, state, batch), None)
        return jax.lax.scan(step, state, (xs, ys))[0]

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    states = jax.jit(jax.vmap(train))(keys)
    for i, seed in enumerate(seeds):
        model, _ = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], states))
        reference = _train_eagerly(Net(rngs=nnx.Rngs(params=jax.random.key(seed))), xs, ys)
        _assert_close(_pure(model), _pure(reference), rtol=1e-5, atol=1e-6)


def test_nnx_jit_train_step_updates_statistics_in_place():
    xs, ys = _batches(9, 3)
    model = Net(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(1)
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    for x, y in zip(xs, ys, strict=True):
        train_step(model, optimizer, x, y)
    assert len(traces) == 1
    reference = _train_eagerly(Net(rngs=nnx.Rngs(0)), xs, ys)
    _assert_close(_pure(model), _pure(reference), rtol=1e-5, atol=1e-6)


def test_nnx_vmap_over_a_batch_of_models_called_twice():
    """flax issue 4760: the second call of a vmapped model with BN raised."""
    members = 4

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Net(rngs=rngs)

    ensemble = create(nnx.Rngs(0))
    graphdef, state = nnx.split(ensemble)
    alone = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(members)]
    forward = nnx.vmap(lambda model, x: model(x), in_axes=(0, 0))
    xs = _normal(11, (members, 8, 6), loc=1.0)
    for call in range(2):
        ys = forward(ensemble, xs + call)
        for i, model in enumerate(alone):
            np.testing.assert_allclose(ys[i], model(xs[i] + call), rtol=1e-5, atol=1e-5)
    for i, model in enumerate(alone):
        mine = jax.tree.map(lambda a, i=i: a[i], _pure(ensemble, nnx.BatchStat))
        _assert_close(mine, _pure(model, nnx.BatchStat), rtol=1e-5, atol=1e-6)


def test_nnx_vmap_of_a_shared_model_with_axis_name_equals_the_global_batch():
    """flax issue 4760's own pattern (one model, the data vmapped): with `axis_name` the
    statistics cover the whole batch, so the shared statistics have one update."""
    x = _normal(12, (4, 8, 5), loc=2.0, scale=3.0)
    shared = bnx.BatchNorm(5, momentum=0.5, axis_name=AXIS, rngs=nnx.Rngs(0))
    reference = bnx.BatchNorm(5, momentum=0.5, rngs=nnx.Rngs(0))
    forward = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name=AXIS)
    for _ in range(2):
        y = forward(shared, x)
        np.testing.assert_allclose(
            y.reshape(-1, 5), reference(x.reshape(-1, 5)), rtol=1e-5, atol=1e-5
        )
    _assert_close(
        _pure(shared, nnx.BatchStat), _pure(reference, nnx.BatchStat), rtol=1e-5, atol=1e-6
    )


def test_nnx_eval_shape_of_a_model_with_batchnorm():
    """flax issue 4734: shapes of a model with BN without computing."""
    abstract = nnx.eval_shape(lambda: nnx_models.CNN(rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    linen = jax.eval_shape(functools.partial(models.CNN().init, train=False), jax.random.key(0), x)
    spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert spec(bnx.to_linen(abstract)) == spec(linen)
    assert nnx.eval_shape(lambda m, x: m(x), abstract, x).shape == (4, 10)
    model = Net(rngs=nnx.Rngs(0))
    before = _pure(model)
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((5, 6), jnp.float32))
    assert (out.shape, out.dtype) == ((5, 3), jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, _pure(model), before)  # nothing was trained
    # The model as the function is a closure over its state: the error says what to do.
    with pytest.raises(errors.TraceContextError, match="as an argument"):
        nnx.eval_shape(model, jax.ShapeDtypeStruct((5, 6), jnp.float32))


def _sharded_step(layer, x, ct, *, check_vma):
    """BN output, statistics and gradients from each device's part of `x` under `shard_map`
    over all devices, with the statistics taken across them."""
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    graphdef, state = nnx.split(layer)

    def per_device(state, x, ct):
        model = nnx.merge(graphdef, state)

        def loss(model, x):
            y = model(x)
            return jnp.sum(y * ct), y

        (dparams, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        if not check_vma:  # pmap (bnlab.training.parallel): per-device parameter gradients
            dparams = jax.lax.psum(dparams, AXIS)
        return y, nnx.state(model, nnx.BatchStat), dparams, dx

    program = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS), P(), P(), P(AXIS)),
            check_vma=check_vma,
        )
    )
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))
    return program(state, place(x), place(ct))


def _global_batch_reference(layer, x, ct):
    y = nnx.clone(layer)(x)
    dparams, dx = nnx.grad(lambda m, x: jnp.sum(m(x) * ct), argnums=(0, 1))(layer, x)
    return y, _pure(layer, nnx.BatchStat), nnx.to_pure_dict(dparams), dx


@pytest.mark.parametrize(
    "backward,check_vma",
    [("analytic", False), ("analytic", True), ("autodiff", False), ("autodiff", True)],
)
def test_shard_map_over_8_devices_equals_the_global_batch(backward, check_vma):
    """check_vma=True (shard_map's default) types scale/bias as replicated, so their gradient
    is the total over the devices; check_vma=False keeps pmap's per-device gradient."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    x, ct = _normal(13, (32, 5), loc=-2.0, scale=3.0), _normal(14, (32, 5))
    kw = dict(momentum=0.5, backward=backward, rngs=nnx.Rngs(0))
    sharded, single = bnx.BatchNorm(5, axis_name=AXIS, **kw), bnx.BatchNorm(5, **kw)
    _randomize([sharded, single], 15)
    y, stats, dparams, dx = _sharded_step(sharded, x, ct, check_vma=check_vma)
    y_ref, stats_ref, dparams_ref, dx_ref = _global_batch_reference(single, x, ct)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    _assert_close(nnx.to_pure_dict(stats), stats_ref, rtol=1e-5, atol=1e-6)
    _assert_close(nnx.to_pure_dict(dparams), dparams_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [
        functools.partial(layers.BatchNorm, momentum=0.5),
        functools.partial(layers.BatchRenorm, momentum=0.5, r_max=1.5, d_max=0.5),
        functools.partial(layers.GhostBatchNorm, momentum=0.5, virtual_batch_size=2),
    ],
    ids=["batchnorm", "batch_renorm", "ghost_batchnorm"],
)
def test_linen_layer_under_shard_map_with_check_vma_equals_the_global_batch(layer):
    """The analytic backward under shard_map's default check_vma=True, with the linen layers:
    the gradient of the replicated scale/bias is the global batch's."""
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    x, ct = _normal(18, (32, 5), loc=1.0, scale=2.0), _normal(19, (32, 5))
    variables = layer().init(jax.random.key(0), x, use_running_average=False)
    params = {"scale": _normal(20, (5,), loc=1.0), "bias": _normal(21, (5,))}
    variables = {**variables, "params": params}

    def step(module, variables, x, ct):
        def loss(params, x):
            y, updates = module.apply(
                {**variables, "params": params}, x, use_running_average=False,
                mutable=["batch_stats"],
            )  # fmt: skip
            return jnp.sum(y * ct), updates["batch_stats"]

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    program = jax.jit(
        jax.shard_map(
            functools.partial(step, layer(axis_name=AXIS)),
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=((P(), P(AXIS)), P()),
        )
    )
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))
    (dparams, dx), stats = program(variables, place(x), place(ct))
    (dparams_ref, dx_ref), stats_ref = step(layer(), variables, x, ct)
    _assert_close(dparams, dparams_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    _assert_close(stats, stats_ref, rtol=1e-5, atol=1e-6)


def test_axis_index_groups_give_each_group_its_own_statistics():
    devices, groups = 8, ((0, 1, 2, 3), (4, 5, 6, 7))
    x = _normal(16, (devices, 3, 4))
    x = x.at[4:].add(5.0)  # the groups' statistics differ visibly
    layer = bnx.BatchNorm(
        4, momentum=0.0, axis_name=AXIS, axis_index_groups=groups, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(layer)

    def per_device(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model, nnx.BatchStat)

    _, stats = jax.pmap(per_device, AXIS, in_axes=(None, 0))(state, x)
    for group in groups:
        part = np.asarray(x)[list(group)].reshape(-1, 4)
        for device in group:
            np.testing.assert_allclose(
                stats["mean"][...][device], part.mean(0), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(stats["var"][...][device], part.var(0), rtol=1e-5)


# --- the state map between the NNX and linen models -------------------------------------------


@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_cnn_state_maps_one_to_one_onto_the_linen_cnn(placement):
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    linen_cnn = models.CNN(
        norm=functools.partial(layers.BatchNorm, momentum=0.5), placement=placement
    )
    norm = functools.partial(bnx.BatchNorm, momentum=0.5)
    nnx_cnn = nnx_models.CNN(norm=norm, placement=placement, rngs=nnx.Rngs(0))
    variables = linen_cnn.init(jax.random.key(0), x, train=False)
    spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert spec(bnx.to_linen(nnx_cnn)) == spec(variables)  # same paths, shapes and dtypes
    bnx.from_linen(nnx_cnn, variables)
    jax.tree.map(np.testing.assert_array_equal, bnx.to_linen(nnx_cnn), variables)  # round trip
    y, updates = linen_cnn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(nnx_cnn(x), y, rtol=1e-6, atol=1e-6)
    stepped = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    _assert_close(bnx.to_linen(nnx_cnn), stepped, rtol=1e-6, atol=1e-7)
    nnx_cnn.eval()
    np.testing.assert_allclose(
        nnx_cnn(x), linen_cnn.apply(stepped, x, train=False), rtol=1e-6, atol=1e-6
    )


def test_from_linen_refuses_variables_that_do_not_match():
    model = Net(rngs=nnx.Rngs(0))
    variables = bnx.to_linen(model)
    missing = {"params": variables["params"]}
    with pytest.raises(ValueError, match="missing batch_stats/norm/mean"):
        bnx.from_linen(model, missing)
    extra = {**variables, "params": {**variables["params"], "extra": {"kernel": jnp.ones(2)}}}
    with pytest.raises(ValueError, match="unexpected params/extra/kernel"):
        bnx.from_linen(model, extra)
    wrong = jax.tree.map(jnp.asarray, variables)  # a copy
    wrong["params"]["head"]["bias"] = jnp.ones(4)
    with pytest.raises(ValueError, match=r"params/head/bias is float32\[4\] but the model has"):
        bnx.from_linen(model, wrong)


def test_to_linen_names_state_that_linen_cannot_hold():
    class WithRngs(nnx.Module):
        def __init__(self):
            self.norm = bnx.BatchNorm(2, rngs=nnx.Rngs(0))
            self.rngs = nnx.Rngs(dropout=1)

    with pytest.raises(ValueError, match="rngs.dropout"):
        bnx.to_linen(WithRngs())


def test_optimizer_state_moves_between_nnx_and_linen_layouts():
    model = Net(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    as_dicts = bnx.states_to_dicts(opt_state)
    linen_params = bnx.to_linen(model)["params"]
    assert jax.tree.structure(as_dicts) == jax.tree.structure(tx.init(linen_params))
    back = bnx.dicts_to_states(as_dicts, like=tx.init(params))
    assert jax.tree.structure(back) == jax.tree.structure(opt_state)
    jax.tree.map(np.testing.assert_array_equal, back, opt_state)


def test_checkpoint_of_the_nnx_model_restores_as_a_linen_train_state(tmp_path):
    """A `TrainState` built through the map saves with bnlab's checkpointer and restores into a
    target built in linen's layout; the restored NNX model computes the same outputs."""
    from bnlab.config import CheckpointConfig
    from bnlab.training.checkpoint import Checkpointer
    from bnlab.training.train import TrainState

    (x, *_), (y, *_) = _batches(17, 1)
    model = _train_eagerly(Net(rngs=nnx.Rngs(0)), x[None], y[None])
    params = nnx.state(model, nnx.Param)
    _, opt_state = TX.update(nnx.grad(_loss)(model, x, y), TX.init(params), params)
    variables = bnx.to_linen(model)
    state = TrainState(
        jnp.asarray(1, jnp.int32),
        variables["params"],
        variables["batch_stats"],
        bnx.states_to_dicts(opt_state),
    )
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    ckpt.save(1, state, {"note": "nnx"})
    fresh = Net(rngs=nnx.Rngs(42))
    linen_layout = bnx.to_linen(fresh)
    target = TrainState(
        jnp.asarray(0, jnp.int32), **linen_layout, opt_state=TX.init(linen_layout["params"])
    )
    restored = ckpt.restore(target).state
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    bnx.from_linen(fresh, {"params": restored.params, "batch_stats": restored.batch_stats})
    model.eval()
    fresh.eval()
    np.testing.assert_array_equal(fresh(x), model(x))

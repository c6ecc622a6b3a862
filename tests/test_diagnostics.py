"""Diagnostics against independent computations: ICS by hand on a two-layer linear network, the
landscape by a Python loop, the Hessian by its dense eigendecomposition, gradients at init by
a hand-written MLP; vmapped over trials equals trial by trial; the registry's rules."""

import dataclasses
import functools
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MNIST_DIR, ROOT

from bnlab import config, diagnostics, layers, models, optim, schema
from bnlab.data import idx
from bnlab.diagnostics import Context, DiagnosticSpec
from bnlab.schema import ConfigError
from bnlab.training import train

BATCH = 32
# These tests check values, not speed: without LLVM's expensive passes XLA compiles on CPU in
# about half the time, and compilation is most of this file's runtime.
jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


@pytest.fixture(scope="module")
def batch():
    """The first training examples of real MNIST: images f32[B,28,28,1] in [0, 1], labels."""
    paths = idx.local_paths(MNIST_DIR)
    images = idx.read_idx(paths["train-images-idx3-ubyte"], "train-images-idx3-ubyte")[:BATCH]
    labels = idx.read_idx(paths["train-labels-idx1-ubyte"], "train-labels-idx1-ubyte")[:BATCH]
    return jnp.asarray(images[..., None] / 255.0, jnp.float32), jnp.asarray(labels, jnp.int32)


def opt_config(**changes) -> optim.OptConfig:
    return dataclasses.replace(optim.OptConfig(), **changes)


def run_config(opt=None, model=None, **diagnostic_fields):
    """What a diagnostic reads of a run's config (the `diagnostics` group is wired into
    `bnlab.config` later)."""
    base = config.validate(config.default_config())
    return types.SimpleNamespace(
        model=model or base.model,
        norm=base.norm,
        opt=opt or base.opt,
        diagnostics=diagnostics.diagnostics_config_class()(**diagnostic_fields),
    )


def context(model, batch, *, opt=None, seed=0, cfg=None) -> Context:
    tx, _ = optim.make_optimizer(opt or opt_config(), 100)
    state = jit(functools.partial(train.init_state, model, tx))(jax.random.key(seed), batch[0])
    return Context(model, tx, state, batch, jax.random.key(100 + seed), cfg or run_config(opt))


def measured(ctx: Context, name: str) -> dict:
    """`measure(ctx, (name,))`, compiled (faster than op by op, even counting compilation)."""

    @jit
    def fn(state, rng):
        return diagnostics.measure(ctx._replace(state=state, rng=rng), (name,))

    return fn(ctx.state, ctx.rng)


def tiny_mlp(backward="analytic", hidden=(8, 8)):
    """A tanh MLP with BN (`backward` its gradient) on 28x28 (or pooled) images."""
    norm = functools.partial(layers.BatchNorm, backward=backward)
    return models.MLP(norm=norm, hidden=hidden, act=nn.tanh)


# --- ics ---------------------------------------------------------------------------------------


def _linear_net_grads(x, y, w1, b1, w2, b2):
    """Closed-form gradients of the mean cross-entropy of `softmax((x w1 + b1) w2 + b2)`."""
    h = x @ w1 + b1
    z = h @ w2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(z.shape[1])[y]) / x.shape[0]  # dL/dz
    delta_h = delta @ w2.T
    return {"dense0": (x.T @ delta_h, delta_h.sum(0)), "head": (h.T @ delta, delta.sum(0))}


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _weights(p):
    return p["dense0"]["kernel"], p["dense0"]["bias"], p["head"]["kernel"], p["head"]["bias"]


def test_ics_of_a_two_layer_linear_network_equals_the_hand_computation(batch):
    lr, mu = 0.1, 0.9
    model = models.MLP(norm=layers.Identity, hidden=(6,), act=models.ACTIVATIONS["linear"])
    ctx0 = context(model, batch, opt=opt_config(name="momentum", lr=lr, momentum=mu))
    other = (batch[0][::-1], batch[1][::-1])  # step 0 trains on another batch
    step = functools.partial(train.train_step, model=model, tx=ctx0.tx, schedule=lambda s: lr)
    state, _ = jit(step)(ctx0.state, other)
    out = measured(ctx0._replace(state=state), "ics")

    x, y = np.asarray(batch[0], np.float64).reshape(BATCH, -1), np.asarray(batch[1])
    w = _f64(state.params)
    # After step 0 the momentum trace is step 0's gradient g0, so step 1's actual update is
    # -lr * (g + mu * g0), with g the gradient on the diagnostic batch.
    g0 = _linear_net_grads(x[::-1], y[::-1], *_weights(_f64(ctx0.state.params)))
    g = _linear_net_grads(x, y, *_weights(w))
    w1 = w["dense0"]["kernel"] - lr * (g["dense0"][0] + mu * g0["dense0"][0])
    b1 = w["dense0"]["bias"] - lr * (g["dense0"][1] + mu * g0["dense0"][1])
    shifted = _linear_net_grads(x, y, w1, b1, w["head"]["kernel"], w["head"]["bias"])
    head = np.concatenate([a.ravel() for a in g["head"]])
    head_shifted = np.concatenate([a.ravel() for a in shifted["head"]])
    expected_l2 = np.linalg.norm(head - head_shifted)
    expected_cos = head @ head_shifted / (np.linalg.norm(head) * np.linalg.norm(head_shifted))

    assert expected_l2 > 1e-3  # the first layer's update does shift the head's gradient
    np.testing.assert_allclose(out["ics/head/l2"], expected_l2, rtol=1e-3)
    np.testing.assert_allclose(out["ics/head/cos"], expected_cos, rtol=1e-5)
    # Nothing comes before the first layer: its gradient cannot shift.
    np.testing.assert_allclose(out["ics/dense0/l2"], 0.0, atol=0)
    np.testing.assert_allclose(out["ics/dense0/cos"], 1.0, rtol=1e-6)
    assert set(out) == {f"ics/{n}/{m}" for n in ("dense0", "head") for m in ("l2", "cos")}


def test_ics_layers_follow_the_forward_pass_and_a_zero_update_shifts_nothing(batch):
    # lr 0: the layers before take a zero update, so G' == G for every layer.
    ctx = context(tiny_mlp(), batch)
    tx = optax.sgd(0.0)
    ctx = ctx._replace(tx=tx, state=ctx.state._replace(opt_state=tx.init(ctx.state.params)))
    out = measured(ctx, "ics")
    assert [k.split("/")[1] for k in out][::2] == ["dense0", "dense1", "head"]
    for layer in ("dense0", "dense1", "head"):
        np.testing.assert_allclose(out[f"ics/{layer}/l2"], 0.0, atol=1e-7)
        np.testing.assert_allclose(out[f"ics/{layer}/cos"], 1.0, rtol=1e-5)


# --- landscape ---------------------------------------------------------------------------------


def _train_loss(model, state, batch):
    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch[0],
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return loss


@pytest.mark.parametrize("scale", ["lr", "lr_now", "absolute"])
def test_landscape_equals_a_python_loop(batch, scale):
    lr, now, grid = 0.2, 0.05, (0.5, 1.0, 2.0, 4.0)  # peak lr, the lr in force (decayed)
    opt = opt_config(lr=lr)
    cfg = run_config(opt, landscape_step_sizes=grid, landscape_scale=scale)
    ctx = context(tiny_mlp(), batch, opt=opt, cfg=cfg)._replace(lr=jnp.float32(now))
    out = measured(ctx, "landscape")
    factor = {"lr": lr, "lr_now": now, "absolute": 1.0}[scale]
    np.testing.assert_allclose(out["landscape/step_scale"], factor, rtol=1e-6)

    loss_fn = _train_loss(ctx.model, ctx.state, batch)
    loss = jit(loss_fn)
    flat, unravel = jax.flatten_util.ravel_pytree(ctx.state.params)
    grad = jit(lambda w: jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(unravel(w)))[0])
    g = np.asarray(grad(flat), np.float64)
    losses, changes, ratios = [], [], []
    for s in grid:
        eta = s * factor
        w = flat - eta * jnp.asarray(g, jnp.float32)
        losses.append(float(loss(unravel(w))))
        changes.append(np.linalg.norm(np.asarray(grad(w), np.float64) - g))
        ratios.append(changes[-1] / np.linalg.norm(eta * g))
    np.testing.assert_allclose(out["landscape/loss_range"], max(losses) - min(losses), rtol=1e-4)
    np.testing.assert_allclose(out["landscape/grad_predictiveness"], max(changes), rtol=1e-4)
    np.testing.assert_allclose(out["landscape/beta_smoothness"], max(ratios), rtol=1e-4)


def test_landscape_default_grid_spans_half_to_four_learning_rates():
    default = diagnostics.diagnostics_config_class()()
    assert min(default.landscape_step_sizes) == 0.5 and max(default.landscape_step_sizes) == 4.0
    assert default.landscape_scale == "lr"


# --- hessian -----------------------------------------------------------------------------------


def _small_problem(batch, backward):
    """A BN MLP small enough for a dense Hessian: 7x7 pooled images, 6 hidden units (382
    parameters); its training loss with BN's `backward`."""
    images = models.avg_pool2(models.avg_pool2(batch[0]))
    model = tiny_mlp(backward, hidden=(6,))
    variables = model.init(jax.random.key(3), images, train=False)
    state = types.SimpleNamespace(batch_stats=variables["batch_stats"])
    return _train_loss(model, state, (images, batch[1])), variables["params"]


@pytest.fixture(scope="module")
def dense_hessian(batch):
    """Eigendecomposition of the dense Hessian, from `jax.hessian` (forward-over-reverse) of
    the autodiff backward: independent of Lanczos, of the HVPs and of the custom VJP."""
    loss, params = _small_problem(batch, "autodiff")
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = np.asarray(jit(jax.hessian(lambda w: loss(unravel(w))))(flat), np.float64)
    np.testing.assert_allclose(h, h.T, atol=1e-5)
    return np.linalg.eigh((h + h.T) / 2)


@pytest.mark.parametrize("backward", ["analytic", "autodiff"])
def test_hessian_top_eigenvalues_match_the_dense_hessian(batch, dense_hessian, backward):
    loss, params = _small_problem(batch, backward)
    top = jit(
        lambda p: diagnostics.hessian_eigenvalues(loss, p, k=3, key=jax.random.key(0), num_iters=60)
    )(params)
    expected = np.linalg.eigvalsh(np.diag(dense_hessian[0]))[::-1][:3]
    assert top.shape == (3,) and top.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(top) - expected) / np.abs(expected), 1e-3)


def test_lanczos_quadrature_reproduces_the_dense_spectral_moments(batch, dense_hessian):
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m: the weighted
    # nodes' moments equal v^T H^j v / |v|^2 = sum_i (q_i . v)^2 lambda_i^j / |v|^2. (Both
    # backwards give the same Hessian-vector products: the eigenvalue test checks both.)
    loss, params = _small_problem(batch, "analytic")
    v = jax.random.normal(jax.random.key(1), jax.flatten_util.ravel_pytree(params)[0].shape)

    @jit
    def quadrature(params, v):
        _, matvec = diagnostics.hessian_matvec(loss, params)
        return diagnostics.lanczos_quadrature(matvec, v, num_iters=8)

    nodes, weights = quadrature(params, v)
    eigenvalues, eigenvectors = dense_hessian
    mass = (eigenvectors.T @ np.asarray(v, np.float64)) ** 2 / np.sum(np.asarray(v) ** 2.0)
    for j in range(5):
        expected = np.sum(mass * eigenvalues**j)
        got = np.sum(np.asarray(weights, np.float64) * np.asarray(nodes, np.float64) ** j)
        np.testing.assert_allclose(got, expected, rtol=2e-3, err_msg=f"moment {j}")


def test_spectral_density_integrates_to_one_and_matches_the_dense_trace(batch, dense_hessian):
    loss, params = _small_problem(batch, "analytic")
    nodes, weights = jit(
        lambda p: diagnostics.spectral_density(
            loss, p, key=jax.random.key(2), num_probes=64, num_iters=10
        )
    )(params)
    assert nodes.shape == weights.shape == (64, 10)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, rtol=1e-5)
    # The density's mean is the trace over n: unbiased over probes, within its sampling error.
    eigenvalues = dense_hessian[0]
    per_probe = np.sum(np.asarray(weights) * np.asarray(nodes), axis=1)
    sem = per_probe.std() / np.sqrt(len(per_probe))
    assert abs(per_probe.mean() - eigenvalues.mean()) < 4 * sem
    grid = jnp.linspace(eigenvalues.min() - 1, eigenvalues.max() + 1, 4001)
    density = diagnostics.gaussian_density(nodes, weights, grid, sigma=0.05)
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-3)


def test_hessian_with_running_statistics_is_the_evaluation_loss(batch):
    # Ghorbani et al.'s population-statistics Hessian: BN normalizes with the running averages.
    images = models.avg_pool2(models.avg_pool2(batch[0]))
    cfg = run_config(hessian_statistics="running", hessian_num_iters=60, hessian_top_k=1)
    ctx = context(tiny_mlp(hidden=(6,)), (images, batch[1]), cfg=cfg)
    stats = jax.tree.map(lambda s: s + 0.5, ctx.state.batch_stats)  # mean 0.5, var 1.5
    ctx = ctx._replace(state=ctx.state._replace(batch_stats=stats))
    out = measured(ctx, "hessian")

    def eval_loss(params):
        logits = ctx.model.apply({"params": params, "batch_stats": stats}, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    expected = jit(
        lambda p: diagnostics.hessian_eigenvalues(
            eval_loss, p, k=1, key=jax.random.key(7), num_iters=60
        )
    )(ctx.state.params)
    np.testing.assert_allclose(out["hessian/lambda_max"], expected[0], rtol=1e-3)
    assert out["hessian/density_nodes"].shape == (2, 60)


def test_hessian_sizes_are_checked(batch):
    loss, params = _small_problem(batch, "analytic")
    with pytest.raises(ValueError, match="num_iters"):
        diagnostics.hessian_eigenvalues(loss, params, k=5, key=jax.random.key(0), num_iters=4)
    with pytest.raises(ValueError, match="number of parameters"):
        diagnostics.hessian_eigenvalues(loss, params, k=1, key=jax.random.key(0), num_iters=999)
    d = diagnostics.diagnostics_config_class()(
        names="hessian", hessian_top_k=9, hessian_num_iters=4
    )
    assert "hessian_top_k=9 exceeds" in diagnostics.problems(d)[0]


# --- init_gradients ----------------------------------------------------------------------------


def _hand_mlp_gradient_norms(params, images, labels, depth, bn):
    """Kernel gradient norms of the MLP written out: x W + b, BN with batch statistics, relu."""
    eps = layers.BatchNorm.epsilon

    def loss(params):
        x = images.reshape(images.shape[0], -1)
        for i in range(depth - 1):
            x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
            if bn:
                gamma_beta = params[f"block{i}"]["norm"]
                x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + eps)
                x = x * gamma_beta["scale"] + gamma_beta["bias"]
            x = jnp.maximum(x, 0)
        logits = x @ params["head"]["kernel"] + params["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jit(jax.grad(loss))(params)
    names = [f"dense{i}" for i in range(depth - 1)] + ["head"]
    return np.array([np.linalg.norm(grads[n]["kernel"]) for n in names])


@pytest.mark.parametrize(("bn", "depth"), [(True, 2), (True, 4), (False, 3)])
def test_init_gradient_norms_equal_jax_grad_per_depth(batch, bn, depth):
    images, labels = batch
    norm = layers.BatchNorm if bn else layers.Identity
    key = jax.random.key(depth)
    got = jit(
        lambda key: diagnostics.init_gradient_norms(
            norm, depth=depth, width=16, images=images, labels=labels, key=key, num_classes=10
        )
    )(key)
    model = models.MLP(norm=norm, hidden=(16,) * (depth - 1), act=nn.relu)
    params = jit(lambda key: model.init(key, images, train=False)["params"])(key)
    expected = _hand_mlp_gradient_norms(params, images, labels, depth, bn)
    assert got.shape == (depth,)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_init_gradients_measure_every_depth_and_normalization(batch):
    cfg = run_config(init_gradients_max_depth=3, init_gradients_width=8)
    ctx = context(tiny_mlp(), batch, cfg=cfg)
    out = jax.eval_shape(lambda: diagnostics.measure(ctx, ("init_gradients",)))
    assert {k: v.shape for k, v in out.items()} == {
        f"init_gradients/{n}/depth{d}": (d,) for n in ("batchnorm", "none") for d in (2, 3)
    }
    assert diagnostics.get("init_gradients").at_init_only


# --- activations -------------------------------------------------------------------------------


def test_activations_are_the_blocks_nonlinearity_inputs_in_training_mode(batch):
    ctx = context(tiny_mlp(), batch)
    out = measured(ctx, "activations")
    _, inter = ctx.model.apply(
        {"params": ctx.state.params, "batch_stats": ctx.state.batch_stats},
        batch[0],
        train=True,
        mutable=["intermediates", "batch_stats"],
    )
    for block in ("block0", "block1"):
        x = np.asarray(inter["intermediates"][block][models.PROBE][0], np.float64).ravel()
        np.testing.assert_allclose(out[f"activations/{block}/mean"], x.mean(), atol=1e-6)
        np.testing.assert_allclose(out[f"activations/{block}/std"], x.std(), rtol=1e-5)
        for q in (15, 50, 85):
            np.testing.assert_allclose(
                out[f"activations/{block}/p{q}"], np.percentile(x, q), rtol=1e-5, atol=1e-6
            )
    unit = run_config(activations_unit=99)
    with pytest.raises(ConfigError, match="activations_unit=99"):
        diagnostics.measure(ctx._replace(cfg=unit), ("activations",))


# --- vmap over trials --------------------------------------------------------------------------


def test_vmapped_trials_equal_separate_runs(batch):
    cfg = run_config(
        init_gradients_max_depth=2,
        init_gradients_width=8,
        hessian_num_iters=8,
        hessian_top_k=2,
        hessian_data_batch_size=8,
        hessian_data_num_iters=8,
        hessian_data_top_k=2,
        hessian_data_num_probes=2,
    )
    names = ("activations", "ics", "landscape", "hessian", "hessian_data", "init_gradients")
    assert set(names) <= set(diagnostics.DIAGNOSTICS)
    # Two trials that differ in seed and in the injected learning rate (in the opt state).
    trials = [
        context(tiny_mlp(hidden=(8,)), batch, opt=opt_config(lr=lr), seed=seed, cfg=cfg)
        for seed, lr in ((0, 0.05), (1, 0.3))
    ]
    ctx = trials[0]

    def fn(state, rng):
        return diagnostics.measure(ctx._replace(state=state, rng=rng), names)

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[(t.state, t.rng) for t in trials])
    vmapped, single_fn = jit(jax.vmap(fn))(*stacked), jit(fn)
    for i, trial in enumerate(trials):
        single = single_fn(trial.state, trial.rng)
        assert single.keys() == vmapped.keys()
        assert {k.split("/")[0] for k in single} == set(names)
        for key, value in single.items():
            np.testing.assert_allclose(vmapped[key][i], value, rtol=2e-4, atol=1e-5, err_msg=key)


# --- registry ----------------------------------------------------------------------------------


def _scaled_norm(ctx):
    return {"l2": ctx.cfg.diagnostics.test_scale * optax.tree.norm(ctx.state.params)}


@pytest.fixture
def registered():
    """Registers `test_weight_norm` from this file (outside bnlab/) and removes it after."""
    spec = DiagnosticSpec(
        fn=_scaled_norm,
        doc="scaled weight norm",
        fields={"test_scale": schema.field(2.0, "weight norm factor", check=schema.positive)},
    )
    try:
        yield diagnostics.register_diagnostic("test_weight_norm", spec)
    finally:
        diagnostics.DIAGNOSTICS.pop("test_weight_norm", None)


def test_a_diagnostic_registered_outside_bnlab_runs_on_a_run_model(registered, batch):
    assert registered.origin.startswith(str(Path(__file__)))
    run_cfg = config.validate(config.load_config(ROOT / "experiments" / "bn_paper_mlp.py"))
    model = train.build_model(run_cfg)
    cfg = run_config(model=run_cfg.model, test_scale=3.0)
    assert diagnostics.parse_names(" test_weight_norm , activations") == (
        "test_weight_norm",
        "activations",
    )
    ctx = context(model, batch, cfg=cfg)
    out = jit(lambda s: diagnostics.measure(ctx._replace(state=s), ("test_weight_norm",)))(
        ctx.state
    )
    np.testing.assert_allclose(
        out["test_weight_norm/l2"], 3.0 * optax.tree.norm(ctx.state.params), rtol=1e-6
    )
    # Its field is in the config group, with its default and check.
    group = diagnostics.diagnostics_config_class()
    assert group().test_scale == 2.0
    problems = schema.field_problems("diagnostics", group(test_scale=-1.0))
    assert problems == ["diagnostics.test_scale=-1.0 must be finite and > 0"]


def test_registering_again_replaces_itself_and_a_taken_name_names_both(registered):
    for _ in range(2):  # the same line twice: an experiment file imported again
        diagnostics.register_diagnostic("test_again", DiagnosticSpec(fn=_scaled_norm))
    try:
        with pytest.raises(ValueError, match="already registered") as err:
            diagnostics.register_diagnostic("test_weight_norm", DiagnosticSpec(fn=_scaled_norm))
        assert registered.origin in str(err.value) and str(Path(__file__)) in str(err.value)
        with pytest.raises(ValueError, match="diagnostics.test_scale"):
            diagnostics.register_diagnostic(
                "test_other",
                DiagnosticSpec(fn=_scaled_norm, fields={"test_scale": schema.field(1.0, "")}),
            )
        with pytest.raises(ValueError, match="every run"):
            diagnostics.register_diagnostic(
                "test_other",
                DiagnosticSpec(fn=_scaled_norm, fields={"names": schema.field("", "")}),
            )
    finally:
        diagnostics.DIAGNOSTICS.pop("test_again", None)


# --- measured in evaluation: the Fig. 1 probe and one registered from here ---------------------


def _block0_mean_collect(intermediates, mask, arg):
    x = intermediates["intermediates"]["block0"][models.PROBE][0]
    return jnp.where(mask, arg * jnp.mean(x.reshape(x.shape[0], -1), axis=1), jnp.nan)


def _block0_mean_reduce(values, arg):
    return {"test_block0_mean": jnp.nanmean(values)}


@pytest.fixture
def registered_in_evaluation():
    """Registers `test_block0_mean`, measured in evaluation, from this file."""
    spec = DiagnosticSpec(
        fn=None,
        doc="mean of block0's nonlinearity input; on with diagnostics.test_block0_factor > 0",
        fields={"test_block0_factor": schema.field(0.0, "its factor (0: off)")},
        on_split=diagnostics.SplitMeasure(
            lambda cfg: cfg.diagnostics.test_block0_factor or None,
            _block0_mean_collect,
            _block0_mean_reduce,
        ),
    )
    try:
        yield diagnostics.register_diagnostic("test_block0_mean", spec)
    finally:
        diagnostics.DIAGNOSTICS.pop("test_block0_mean", None)


def test_diagnostics_measured_in_evaluation_cover_the_whole_split(registered_in_evaluation):
    """The Fig. 1 probe (`train.probe_unit`) is the registered `probe`; one registered outside
    bnlab/ joins the split's metrics the same way; both over every real row of the split."""
    model = tiny_mlp()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (70, 28, 28, 1), np.uint8))
    labels = jnp.arange(70, dtype=jnp.int32) % 10
    tx, _ = optim.make_optimizer(opt_config(), 100)
    state = jit(functools.partial(train.init_state, model, tx))(jax.random.key(0), images[:8])
    group = diagnostics.diagnostics_config_class()
    cfg = types.SimpleNamespace(
        train=types.SimpleNamespace(probe_unit=3), diagnostics=group(test_block0_factor=2.0)
    )
    measures = diagnostics.split_measures(cfg)
    assert [m for m, _ in measures] == [
        diagnostics.get("probe").on_split,
        registered_in_evaluation.on_split,
    ]
    assert [arg for _, arg in measures] == [3, 2.0]
    got = train.evaluate(  # 30 does not divide 70: the padded rows must not count
        state.params, state.batch_stats, images, labels, model=model, batch_size=30,
        measures=measures,
    )  # fmt: skip
    _, inter = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        images / jnp.float32(255.0),
        train=False,
        mutable=["intermediates"],
    )
    x0 = np.asarray(inter["intermediates"]["block0"][models.PROBE][0], np.float64)
    x1 = np.asarray(inter["intermediates"]["block1"][models.PROBE][0])
    np.testing.assert_allclose(got["test_block0_mean"], 2.0 * x0.mean(), rtol=1e-5)
    want = np.percentile(x1[:, 3], (15, 50, 85))
    np.testing.assert_allclose([got[f"act_p{q}"] for q in (15, 50, 85)], want, rtol=1e-5)
    # train.probe_unit alone selects the same registered probe.
    cfg.train.probe_unit, cfg.diagnostics = -1, group()
    assert diagnostics.split_measures(cfg) == ()
    alone = train.evaluate(
        state.params, state.batch_stats, images, labels, model=model, batch_size=30,
        probe_unit=3,
    )  # fmt: skip
    assert set(alone) == {"loss", "accuracy", "act_p15", "act_p50", "act_p85"}
    np.testing.assert_array_equal([alone[f"act_p{q}"] for q in (15, 50, 85)],
                                  [got[f"act_p{q}"] for q in (15, 50, 85)])  # fmt: skip


def test_a_diagnostic_measured_in_evaluation_is_refused_in_names(batch):
    group = diagnostics.diagnostics_config_class()
    (problem,) = schema.field_problems("diagnostics", group(names="ics,probe"))
    assert "['probe']" in problem and "train.probe_unit" in problem
    with pytest.raises(ConfigError, match="train.probe_unit"):
        diagnostics.parse_names("probe")
    with pytest.raises(ConfigError, match="measured in evaluation"):
        diagnostics.measure(context(tiny_mlp(), batch), ("probe",))
    (unknown,) = schema.field_problems("diagnostics", group(names="nope"))
    assert "'probe'" not in unknown  # the names offered are the ones names= accepts
    # A spec is one kind or the other; an evaluation-time one checks its own field.
    on_split = diagnostics.get("probe").on_split
    for bad in ({}, {"fn": _scaled_norm, "on_split": on_split}):
        with pytest.raises(ValueError, match="exactly one"):
            DiagnosticSpec(**{"fn": None, **bad})
    with pytest.raises(ValueError, match="schema.field"):
        DiagnosticSpec(fn=None, on_split=on_split, check=lambda c: [])


def test_evaluation_measures_may_not_overwrite_the_splits_metrics():
    model = tiny_mlp()
    images = jnp.zeros((10, 28, 28, 1), jnp.uint8)
    tx, _ = optim.make_optimizer(opt_config(), 100)
    state = jit(functools.partial(train.init_state, model, tx))(jax.random.key(0), images[:4])
    clash = diagnostics.SplitMeasure(
        lambda cfg: 1, lambda inter, mask, arg: mask, lambda v, arg: {"loss": jnp.sum(v)}
    )
    with pytest.raises(ValueError, match=r"\['loss'\], taken"):
        train.evaluate(
            state.params, state.batch_stats, images, jnp.zeros(10, jnp.int32), model=model,
            batch_size=5, measures=((clash, 1),),
        )  # fmt: skip


def test_the_probe_unit_is_checked_against_the_last_layer_before_anything_runs():
    for name, last in (("bn_paper_mlp.py", 100), ("mnist_cnn.py", 256)):
        cfg = config.load_config(ROOT / "experiments" / name)
        ok = config.apply_overrides(cfg, {"train.probe_unit": str(last - 1)})
        assert config.validate(ok).train.probe_unit == last - 1
        bad = config.apply_overrides(cfg, {"train.probe_unit": str(last)})
        with pytest.raises(ConfigError, match=f"train.probe_unit={last} but .* has {last} units"):
            config.validate(bad)


def test_unknown_names_are_config_errors_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"'ics', 'init_gradients', 'landscape'") as err:
        diagnostics.parse_names("ics,landscpe")
    assert "'landscpe'" in str(err.value)
    group = diagnostics.diagnostics_config_class()
    problems = schema.field_problems("diagnostics", group(names="hessian, nope"))
    assert len(problems) == 1 and "['nope']" in problems[0] and "register_diagnostic" in problems[0]
    assert diagnostics.parse_names("") == ()
    assert schema.field_problems("diagnostics", group(init_gradients_norms="batchnorm,bn"))

"""The normalizations of weights against their definitions: weight normalization (Salimans &
Kingma 2016) and weight standardization with GroupNorm (Qiao et al. 2019), from the pure
functions to the models that a config builds, and a short real training run of each."""

import json

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bnlab import config, layers, models, norms, optim, schema
from bnlab import nnx as bnx
from bnlab import norm as norm_lib
from bnlab.diagnostics import init_gradients, weight_norms
from bnlab.nn import nnx_models
from bnlab.training import run, train

MLP = "experiments/bn_paper_mlp.py"
CNN = "experiments/mnist_cnn.py"
# (model, layers before a normalization site) of the two models.
SITES = {"mlp": ("dense0", "dense1", "dense2"), "cnn": ("conv0", "conv1", "dense")}


def _config(norm, name, **overrides):
    overrides = {"model.norm": norm, "model.name": name, "norm.num_groups": "4", **overrides}
    return config.validate(config.apply_overrides(config.default_config(), overrides))


def _images(seed, batch=4):
    return jax.random.uniform(jax.random.key(seed), (batch, 28, 28, 1))


def _init(model, x):
    return jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x)


def _site_by_hand(name, x, kernel, bias):
    """A plain Dense (the MLP) or SAME convolution (the CNN) with `kernel`, plus `bias`."""
    kernel = jnp.asarray(kernel, jnp.float32)
    if name == "mlp":
        return x.reshape(x.shape[0], -1) @ kernel + bias
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims) + bias


def _unit_axes(w):
    return tuple(range(w.ndim - 1))


def _weight_norm_by_hand(v, g):
    v = np.asarray(v, np.float64)
    return np.asarray(g, np.float64) * v / np.sqrt(np.sum(v**2, axis=_unit_axes(v), keepdims=True))


def _standardized_by_hand(w, eps):
    w = np.asarray(w, np.float64)
    mean = w.mean(axis=_unit_axes(w), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=_unit_axes(w), keepdims=True)
    return (w - mean) / np.sqrt(var + eps)


def _with_random_scales(params, seed):
    """`params` with every weight normalization's `g` drawn in [0.5, 2]: no longer `||v||`."""
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda a: a, params)
    for site in out:
        if "norm" in out[site] and "scale" in out[site]["norm"]:
            shape = out[site]["norm"]["scale"].shape
            out[site]["norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
    return out


def _effective(params, kernel_of):
    """The params of the same model without its kernel normalization: each site's kernel
    replaced by `kernel_of(site params)`, its `norm` (kernel) entry dropped."""
    out = {}
    for site, p in params.items():
        p = dict(p)
        if site in SITES["mlp"] + SITES["cnn"] and "kernel" in p:
            p["kernel"] = jnp.asarray(kernel_of(p), jnp.float32)
            p.pop("norm", None)
        out[site] = p
    return out


# --- the registry entries -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, output", [("weightnorm", "Identity"), ("ws_groupnorm", "GroupNorm")]
)
def test_registered_on_the_kernel_with_an_output_layer(name, output):
    spec = norms.get(name)
    assert spec.on_kernel and not spec.batch_stats and spec.torch is None
    assert not norms.get("groupnorm").on_kernel
    assert norms.build_kernel(_config("none", "mlp")) is None
    cfg = _config(name, "cnn")
    layer = norms.build(cfg)
    assert getattr(layer, "func", layer).__name__ == output


# --- weight normalization -------------------------------------------------------------------


def test_weight_norm_is_g_v_over_the_norm_of_each_unit_and_starts_at_v():
    v = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype(np.float32)
    g = np.random.default_rng(1).uniform(0.5, 2.0, 6).astype(np.float32)
    np.testing.assert_allclose(norm_lib.weight_norm(v, g), _weight_norm_by_hand(v, g), rtol=1e-6)
    # Each unit's kernel has length g_j, whatever v's.
    w = norm_lib.weight_norm(v * np.arange(1, 7, dtype=np.float32), g)
    np.testing.assert_allclose(np.sqrt(np.sum(np.square(w), axis=(0, 1, 2))), g, rtol=1e-6)
    variables = layers.WeightNorm().init(jax.random.key(0), v)
    np.testing.assert_allclose(
        variables["params"]["scale"], np.sqrt(np.sum(np.square(v), axis=(0, 1, 2))), rtol=1e-6
    )
    np.testing.assert_allclose(layers.WeightNorm().apply(variables, v), v, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"one length per output unit, \(6,\)"):
        norm_lib.weight_norm(v, g[:5])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_weightnorm_model_is_the_plain_model_with_kernels_g_v_over_norm(name):
    """Every site's layer computes with `g * v / ||v||` (by hand, per output unit), and its
    output is the site's output: the model equals the same model without normalization whose
    kernels are those, and its first site equals a plain Dense/Conv by hand."""
    x = _images(1)
    model = train.build_model(_config("weightnorm", name))
    variables = _init(model, x)
    assert set(variables) == {"params"}  # no batch_stats
    params = _with_random_scales(variables["params"], 2)
    for site in SITES[name]:
        assert set(params[site]) == {"kernel", "bias", "norm"}
        assert params[site]["norm"]["scale"].shape == (params[site]["kernel"].shape[-1],)
    assert "norm" not in params["head"]

    logits, state = model.apply({"params": params}, x, train=True, mutable=["intermediates"])
    first = SITES[name][0]
    w = _weight_norm_by_hand(params[first]["kernel"], params[first]["norm"]["scale"])
    want = _site_by_hand(name, x, w, params[first]["bias"])
    act_input = state["intermediates"]["block0"][models.PROBE][0]
    np.testing.assert_allclose(act_input, want, rtol=1e-4, atol=1e-5)

    plain = train.build_model(_config("none", name))
    effective = _effective(params, lambda p: _weight_norm_by_hand(p["kernel"], p["norm"]["scale"]))
    want_logits = plain.apply({"params": effective}, x, train=True)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


def _mlp_loss(model, x, labels):
    return lambda params: train.cross_entropy(
        model.apply({"params": params}, x, train=True), labels
    )


def test_weightnorm_loss_is_invariant_to_the_scale_of_v_and_its_gradient_is_eq_3():
    """Salimans & Kingma (2016): L(g, c v) = L(g, v) for c > 0 per unit; eq. 3,
    grad_g = grad_w . v / ||v||, grad_v = g / ||v|| * (grad_w - grad_g * v / ||v||), so that
    grad_v is orthogonal to v; grad_w from the plain model with the kernels w."""
    x, labels = _images(3, 8), jnp.arange(8) % 10
    cfg = _config("weightnorm", "mlp", **{"model.activation": "sigmoid"})
    model = train.build_model(cfg)
    params = _with_random_scales(_init(model, x)["params"], 4)
    loss = jax.jit(jax.value_and_grad(_mlp_loss(model, x, labels)))
    value, grads = loss(params)

    scaled = jax.tree.map(lambda a: a, params)
    rng = np.random.default_rng(5)
    for site in SITES["mlp"]:
        c = rng.uniform(0.1, 10.0, params[site]["kernel"].shape[-1]).astype(np.float32)
        scaled[site]["kernel"] = params[site]["kernel"] * c
    np.testing.assert_allclose(loss(scaled)[0], value, rtol=1e-5)

    plain = train.build_model(_config("none", "mlp", **{"model.activation": "sigmoid"}))
    effective = _effective(params, lambda p: _weight_norm_by_hand(p["kernel"], p["norm"]["scale"]))
    plain_grads = jax.grad(_mlp_loss(plain, x, labels))(effective)
    for site in SITES["mlp"]:
        v = np.asarray(params[site]["kernel"], np.float64)
        g = np.asarray(params[site]["norm"]["scale"], np.float64)
        grad_w = np.asarray(plain_grads[site]["kernel"], np.float64)
        grad_v = np.asarray(grads[site]["kernel"], np.float64)
        norms_v = np.linalg.norm(v, axis=0)
        grad_g = np.sum(grad_w * v, axis=0) / norms_v
        np.testing.assert_allclose(grads[site]["norm"]["scale"], grad_g, rtol=1e-4, atol=1e-8)
        want_v = g / norms_v * (grad_w - grad_g * v / norms_v)
        np.testing.assert_allclose(grad_v, want_v, rtol=1e-3, atol=1e-7)
        cosine = np.sum(grad_v * v, axis=0) / (np.linalg.norm(grad_v, axis=0) * norms_v)
        assert np.max(np.abs(cosine)) < 1e-4, cosine  # orthogonal to v, unit by unit
        assert np.min(np.linalg.norm(grad_v, axis=0)) > 0  # and not by vanishing
        np.testing.assert_allclose(grads[site]["bias"], plain_grads[site]["bias"], rtol=1e-4)


def test_weight_norm_layers_feed_a_normalization_for_the_weight_norms_diagnostic():
    params = {"dense0": {"kernel": 0, "bias": 0, "norm": {"scale": 0}}, "block0": {},
              "head": {"kernel": 0, "bias": 0}}  # fmt: skip
    assert weight_norms.feeds_normalization(params, ("dense0", "block0", "head")) == {
        "dense0": True,
        "head": False,
    }


# --- weight standardization with GroupNorm --------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (20, 5)])
def test_weight_standardization_has_mean_0_and_variance_1_per_unit(shape):
    w = np.random.default_rng(6).normal(0.3, 0.05, shape).astype(np.float32)
    axes = _unit_axes(w)
    w_hat = np.asarray(norm_lib.weight_standardize(w, epsilon=1e-8), np.float64)
    np.testing.assert_allclose(w_hat.mean(axis=axes), 0.0, atol=1e-5)
    np.testing.assert_allclose(w_hat.var(axis=axes), 1.0, rtol=1e-4)
    # With a large epsilon, the closed form: variance var / (var + eps), mean still 0.
    eps = 0.0025
    w_hat = np.asarray(norm_lib.weight_standardize(w, epsilon=eps), np.float64)
    var = np.asarray(w, np.float64).var(axis=axes)
    np.testing.assert_allclose(w_hat.var(axis=axes), var / (var + eps), rtol=1e-4)
    np.testing.assert_allclose(w_hat, _standardized_by_hand(w, eps), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be > 0"):
        norm_lib.weight_standardize(w, epsilon=0.0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ws_groupnorm_model_is_groupnorm_of_the_standardized_kernels_output(name):
    """The first site's output is `group_norm(conv(x, w_hat) + b)` by hand with the pure
    function, and the whole model the `groupnorm` model with standardized kernels."""
    x = _images(7)
    cfg = _config("ws_groupnorm", name)
    model = train.build_model(cfg)
    variables = _init(model, x)
    assert set(variables) == {"params"}  # no batch_stats
    rng = np.random.default_rng(8)  # random GroupNorm scale/bias, kernels off zero mean
    shift = lambda a: a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape), a.dtype)  # noqa: E731
    params = jax.tree.map(shift, variables["params"])
    assert jax.tree.structure(params) == jax.tree.structure(
        _init(train.build_model(_config("groupnorm", name)), x)["params"]
    )  # the variables of groupnorm: weight standardization has none
    eps = cfg.norm.ws_epsilon
    _, state = model.apply({"params": params}, x, train=True, mutable=["intermediates"])
    first = SITES[name][0]
    w_hat = _standardized_by_hand(params[first]["kernel"], eps)
    pre = _site_by_hand(name, x, w_hat, params[first]["bias"])
    gn = params["block0"]["norm"]
    want = norm_lib.group_norm(pre, gn["scale"], gn["bias"], num_groups=4, epsilon=1e-5)
    act_input = state["intermediates"]["block0"][models.PROBE][0]
    np.testing.assert_allclose(act_input, want, rtol=1e-4, atol=1e-4)

    logits = model.apply({"params": params}, x, train=True)
    gn_model = train.build_model(_config("groupnorm", name))
    effective = _effective(params, lambda p: _standardized_by_hand(p["kernel"], eps))
    np.testing.assert_allclose(gn_model.apply({"params": effective}, x, train=True), logits,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


# --- NNX --------------------------------------------------------------------------------------


def test_nnx_weight_norm_starts_at_v_and_a_kernel_norm_without_nnx_is_refused():
    v = jax.random.normal(jax.random.key(9), (5, 3))
    layer = bnx.WeightNorm(v, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer.scale[...], np.linalg.norm(np.asarray(v), axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer(v), v, rtol=1e-6, atol=1e-7)
    spec = norms.get("weightnorm")
    linen_only = norms.NormSpec(layer=spec.layer, nnx=spec.nnx, kernel=spec.kernel)
    norms.register_norm("wn_linen_only", linen_only)
    try:
        cfg = _config("wn_linen_only", "mlp")
        with pytest.raises(schema.ConfigError, match="no NNX module .* train the linen model"):
            nnx_models.build_model(cfg, rngs=nnx.Rngs(0))
        train.build_model(cfg)  # the linen model is fine
    finally:
        norms.unregister_norm("wn_linen_only")


# --- real training runs -----------------------------------------------------------------------


def _finished_with_finite_loss(workdir):
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and np.all(np.isfinite(losses)) and np.isfinite(summary["test_loss"])
    state = run.load_checkpoint(workdir)[1].state
    assert state.batch_stats == {}  # no running statistics to keep
    return summary, state


# The paper MLP (sigmoid, std 0.01 init) does not leave chance in 10 steps without BN, nor
# with weight normalization, which starts as the network without normalization (w = v); the
# CNN's smoke run (10 steps) does.
@pytest.mark.parametrize(
    "path, norm, overrides, min_accuracy",
    [
        (MLP, "weightnorm", {"data.train_size": 600, "train.epochs": 1}, 0.0),
        (CNN, "weightnorm", {"data.train_size": 1280, "train.epochs": 1}, 0.2),  # its SMOKE
        (CNN, "ws_groupnorm", {"data.train_size": 1280, "train.epochs": 1}, 0.2),
    ],
    ids=["mlp-weightnorm", "cnn-weightnorm", "cnn-ws_groupnorm"],
)
def test_a_short_real_training_run_finishes_with_finite_loss(
    path, norm, overrides, min_accuracy, make_config, tmp_path
):
    cfg = make_config(path, **{"model.norm": norm, **overrides})
    summary, state = _finished_with_finite_loss(_run(cfg, tmp_path))
    assert summary["test_accuracy"] >= min_accuracy
    first = SITES[cfg.model.name][0]
    assert ("norm" in state.params[first]) == (norm == "weightnorm")


def _run(cfg, tmp_path):
    workdir = tmp_path / "run"
    run.run(cfg, workdir)
    return workdir


def test_equals_flax_weight_norm_given_its_scale():
    """flax's `WeightNorm` wrapper (whose `scale` starts at 1, not at `||v||`) computes the same
    `scale * v / ||v||`: given its kernel and scale, bnlab's Dense gives its outputs."""
    x = jax.random.normal(jax.random.key(10), (4, 6))
    wrapped = fnn.WeightNorm(fnn.Dense(3))
    theirs = wrapped.init(jax.random.key(11), x)["params"]
    scale = jnp.asarray([0.5, 1.5, 2.0])
    theirs = {**theirs, "layer_instance/kernel/scale": scale}
    dense = theirs["layer_instance"]
    params = {"kernel": dense["kernel"], "bias": dense["bias"], "norm": {"scale": scale}}
    np.testing.assert_allclose(
        models.Dense(3, layers.WeightNorm).apply({"params": params}, x),
        wrapped.apply({"params": theirs}, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_opt_trainable_norm_trains_g_alone():
    cfg = _config("weightnorm", "mlp", **{"opt.trainable": "norm"})
    model = train.build_model(cfg)
    params = jax.eval_shape(lambda: _init(model, _images(0))["params"])
    labels = optim.trainable_labels(cfg.opt, params)
    assert labels["dense0"] == {"kernel": "frozen", "bias": "frozen", "norm": {"scale": "train"}}
    assert labels["head"] == {"kernel": "frozen", "bias": "frozen"}


def test_init_gradients_measure_the_gradient_of_v():
    """At initialization `w = v` and `g = ||v||`: by eq. 3 the gradient of `v` is the plain
    network's gradient of `w` without its component along `v`, unit by unit."""
    x, labels = _images(11, 8), jnp.arange(8) % 10
    kw = dict(depth=3, width=16, images=x, labels=labels, key=jax.random.key(12), num_classes=10)
    ours = init_gradients.init_gradient_norms(layers.Identity, kernel_norm=layers.WeightNorm, **kw)
    model = models.MLP(norm=layers.Identity, hidden=(16, 16), act=fnn.relu)
    params = model.init(kw["key"], x, train=False)["params"]  # the measurement's kernels
    grads = jax.grad(_mlp_loss(model, x, labels))(params)
    want = []
    for site in ("dense0", "dense1", "head"):
        v, grad_w = (np.asarray(t[site]["kernel"], np.float64) for t in (params, grads))
        if site != "head":  # the head's kernel is not normalized
            unit = v / np.linalg.norm(v, axis=0)
            grad_w = grad_w - np.sum(grad_w * unit, axis=0) * unit
        want.append(np.linalg.norm(grad_w))
    np.testing.assert_allclose(ours, want, rtol=1e-4)

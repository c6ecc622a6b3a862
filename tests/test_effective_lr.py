"""Scale invariance: the learning rate in force (`optim.lr_now`) against the schedule, and the
`weight_norms` diagnostic against closed forms (||W||, lr / ||W||^2, and the loss's invariance
to a kernel's scale where a normalization follows)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_diagnostics import batch, context, measured, run_config  # noqa: F401 - a fixture

from bnlab import optim
from bnlab.diagnostics.common import batch_loss
from bnlab.nn import layers, models


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step", "exponential", "warmup_cosine"])
def test_lr_now_is_the_schedule_at_the_step_per_trial(schedule):
    c = dataclasses.replace(optim.OptConfig(), schedule=schedule, lr=0.3, warmup_steps=10)
    total, params = 100, {"w": jnp.zeros(3)}
    for step in (0, 7, 50, 99):
        tx, sched = optim.make_optimizer(c, total)
        state = tx.init(params)
        np.testing.assert_allclose(optim.lr_now(c, state, step, total), sched(step), rtol=1e-6)
    # Vmapped trials with their own learning rates: each trial's own schedule.
    lrs = jnp.array([0.01, 0.1, 1.0])

    def init(lr):
        tx, _ = optim.make_optimizer(c, total, {**optim.hyperparams(c), "lr": lr})
        return tx.init(params)

    states = jax.vmap(init)(lrs)
    got = jax.vmap(lambda s: optim.lr_now(c, s, 40, total))(states)
    for lr, value in zip(lrs, got, strict=True):
        want = optim.make_schedule(dataclasses.replace(c, lr=float(lr)), total)(40)
        np.testing.assert_allclose(value, want, rtol=1e-6)


def test_lr_now_follows_reduce_on_plateau():
    c = dataclasses.replace(optim.OptConfig(), schedule="plateau", lr=0.2, decay_rate=0.5)
    tx, _ = optim.make_optimizer(c, 100)
    state = tx.init({"w": jnp.zeros(3)})
    for _ in range(c.plateau_patience + 2):  # no improvement: the scale drops once
        state = optim.plateau_step(state, 1.0, c)
    scale = float(optim.lr_scale(state))
    assert scale < 1.0
    np.testing.assert_allclose(optim.lr_now(c, state, 10, 100), 0.2 * scale, rtol=1e-6)


def _bn_mlp():
    return models.MLP(norm=layers.BatchNorm, hidden=(8, 8), act=jax.nn.relu)


def test_weight_norms_closed_forms_and_scale_invariance(batch):  # noqa: F811 - the fixture
    cfg = run_config()
    ctx = context(_bn_mlp(), batch, cfg=cfg)._replace(lr=jnp.float32(0.05))
    out = measured(ctx, "weight_norms")
    params = ctx.state.params
    kernels = {n: p["kernel"] for n, p in params.items() if "kernel" in p}
    assert set(kernels) == {"dense0", "dense1", "head"}
    for name, kernel in kernels.items():
        norm = np.linalg.norm(np.asarray(kernel, np.float64))
        np.testing.assert_allclose(out[f"weight_norms/{name}/weight_norm"], norm, rtol=1e-5)
        if name == "head":  # no normalization after the output layer
            assert "weight_norms/head/effective_lr" not in out
        else:
            want = 0.05 / norm**2
            np.testing.assert_allclose(out[f"weight_norms/{name}/effective_lr"], want, rtol=1e-5)
    # Where BN follows, the loss does not depend on the kernel's scale (the reason the
    # effective learning rate is lr / ||W||^2): 3x dense0's kernel, the same loss.
    loss = batch_loss(ctx)
    scaled = {**params, "dense0": {**params["dense0"], "kernel": 3.0 * params["dense0"]["kernel"]}}
    np.testing.assert_allclose(loss(scaled), loss(params), rtol=1e-4)
    assert abs(float(loss({**params, "head": jax.tree.map(lambda x: 3 * x, params["head"])}))
               - float(loss(params))) > 1e-3  # fmt: skip


def test_weight_norms_without_normalization_report_norms_only(batch):  # noqa: F811
    model = models.MLP(hidden=(8, 8), act=jax.nn.relu)  # no normalization
    ctx = context(model, batch, cfg=run_config())._replace(lr=jnp.float32(0.05))
    out = measured(ctx, "weight_norms")
    assert sorted(out) == [f"weight_norms/{n}/weight_norm" for n in ("dense0", "dense1", "head")]
    np.testing.assert_allclose(
        out["weight_norms/dense0/weight_norm"],
        optax.tree.norm(ctx.state.params["dense0"]["kernel"]),
        rtol=1e-6,
    )


def test_effective_rank_closed_forms():
    from bnlab.diagnostics.rank import effective_rank

    ones = jnp.ones((16, 5))
    np.testing.assert_allclose(effective_rank(ones), 1.0, rtol=1e-4)  # every row the same
    eye = jnp.eye(6, 10)  # six equal singular values
    np.testing.assert_allclose(effective_rank(eye), 6.0, rtol=1e-4)
    assert float(effective_rank(jnp.zeros((4, 3)))) == 0.0
    x = jax.random.normal(jax.random.key(0), (12, 7, 3))
    s = np.linalg.svd(np.asarray(x, np.float64).reshape(12, -1), compute_uv=False)
    p = s / s.sum()
    np.testing.assert_allclose(effective_rank(x), np.exp(-(p * np.log(p)).sum()), rtol=1e-4)


def test_rank_diagnostic_is_each_layers_output_rank(batch):  # noqa: F811 - the fixture
    from bnlab.diagnostics.rank import layer_outputs

    ctx = context(_bn_mlp(), batch, cfg=run_config())
    out = measured(ctx, "rank")
    outputs = layer_outputs(ctx)
    assert list(outputs) == ["dense0", "block0", "dense1", "block1", "head"]
    for name, y in outputs.items():
        s = np.linalg.svd(np.asarray(y, np.float64).reshape(y.shape[0], -1), compute_uv=False)
        p = s[s > 0] / s.sum()
        np.testing.assert_allclose(out[f"rank/{name}"], np.exp(-(p * np.log(p)).sum()), rtol=1e-3)

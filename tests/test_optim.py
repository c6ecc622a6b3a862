"""Config to optax chain: each optimizer, schedule and clip equals its optax reference."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnlab import config, optim

BASE = config.validate(config.default_config()).opt
PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
GRADS = {"w": jnp.array([0.3, -4.0, 0.1]), "b": jnp.array([2.0])}


def _opt(**kw):
    return dataclasses.replace(BASE, **kw)


def _updates(tx, steps=3):
    state, out = tx.init(PARAMS), []
    for _ in range(steps):
        u, state = tx.update(GRADS, state, PARAMS)
        out.append(u)
    return out


REFERENCES = {
    "sgd": lambda c: optax.sgd(c.lr),
    "momentum": lambda c: optax.sgd(c.lr, momentum=c.momentum),
    "nesterov": lambda c: optax.sgd(c.lr, momentum=c.momentum, nesterov=True),
    "adam": lambda c: optax.adam(c.lr, b1=c.b1, b2=c.b2, eps=c.eps),
    "adamw": lambda c: optax.adamw(c.lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
    "rmsprop": lambda c: optax.rmsprop(c.lr, decay=c.decay, eps=c.eps, momentum=c.rmsprop_momentum),
    "adagrad": lambda c: optax.adagrad(c.lr, eps=c.eps),
}


def test_every_optimizer_is_covered():
    assert set(REFERENCES) == set(optim.OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_optimizer_matches_optax(name):
    c = _opt(name=name, lr=0.1, rmsprop_momentum=0.5)
    tx, _ = optim.make_optimizer(c, total_steps=10)
    for got, want in zip(_updates(tx), _updates(REFERENCES[name](c)), strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_schedules_closed_forms():
    total, lr = 100, 0.4
    cos = optim.make_schedule(_opt(schedule="cosine", lr=lr), total)
    exp = optim.make_schedule(_opt(schedule="exponential", lr=lr, decay_rate=0.01), total)
    step = optim.make_schedule(_opt(schedule="step", lr=lr, boundaries=(0.5, 0.75)), total)
    warm = optim.make_schedule(_opt(schedule="warmup_cosine", lr=lr, warmup_steps=10), total)
    const = optim.make_schedule(_opt(schedule="constant", lr=lr), total)
    for t in (0, 10, 49, 50, 74, 75, 99):
        assert math.isclose(
            cos(t), lr * 0.5 * (1 + math.cos(math.pi * t / total)), rel_tol=1e-5, abs_tol=1e-6
        )
        assert math.isclose(exp(t), lr * 0.01 ** (t / total), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(
            step(t), lr * 0.1 ** ((t >= 50) + (t >= 75)), rel_tol=1e-5, abs_tol=1e-6
        )
        assert math.isclose(const(t), lr)
    assert math.isclose(warm(5), lr * 0.5, rel_tol=1e-5) and math.isclose(
        warm(10), lr, rel_tol=1e-5, abs_tol=1e-6
    )


def test_clip_by_global_norm_and_value():
    tx, _ = optim.make_optimizer(_opt(name="sgd", lr=1.0, clip="global_norm", clip_value=1.0), 10)
    (u,) = _updates(tx, 1)
    assert math.isclose(float(optax.tree.norm(u)), 1.0, rel_tol=1e-5, abs_tol=1e-6)
    tx, _ = optim.make_optimizer(_opt(name="sgd", lr=1.0, clip="value", clip_value=0.5), 10)
    (u,) = _updates(tx, 1)
    np.testing.assert_allclose(u["w"], -np.clip(GRADS["w"], -0.5, 0.5))


def test_weight_decay_is_added_to_the_gradient():
    tx, _ = optim.make_optimizer(_opt(name="sgd", lr=0.1, weight_decay=0.01), 10)
    (u,) = _updates(tx, 1)
    np.testing.assert_allclose(u["w"], -0.1 * (GRADS["w"] + 0.01 * PARAMS["w"]), rtol=1e-6)


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*'adam'"):
        optim.make_optimizer(_opt(name="lion"), 10)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        optim.make_optimizer(_opt(schedule="linear"), 10)
    with pytest.raises(ValueError, match="unknown clip 'norm'"):
        optim.make_optimizer(_opt(clip="norm"), 10)


def test_step_boundaries_on_the_same_step_multiply():
    step = optim.make_schedule(_opt(schedule="step", lr=1.0, boundaries=(0.5, 0.75)), 2)
    assert math.isclose(step(0), 1.0) and math.isclose(step(1), 0.01, rel_tol=1e-5)


def test_rmsprop_momentum_is_its_own_field():
    c = _opt(name="rmsprop", lr=0.1, momentum=0.9, rmsprop_momentum=0.0)
    tx, _ = optim.make_optimizer(c, 10)
    want = optax.rmsprop(0.1, decay=c.decay, eps=c.eps)
    for got, ref in zip(_updates(tx), _updates(want), strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, ref)


@pytest.mark.parametrize("schedule", sorted(optim.SCHEDULES))
def test_schedules_accept_traced_hyperparameters(schedule):
    c = _opt(schedule=schedule, lr=0.3, decay_rate=0.2, warmup_steps=10)
    traced = jax.jit(
        lambda lr, rate, t: optim.make_schedule(
            dataclasses.replace(c, lr=lr, decay_rate=rate), 100
        )(t)
    )
    plain = optim.make_schedule(c, 100)
    for t in (0, 5, 50, 75, 99):
        np.testing.assert_allclose(traced(0.3, 0.2, t), plain(t), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
@pytest.mark.parametrize(
    "schedule, clip",
    [
        ("constant", "global_norm"),
        ("step", "value"),
        ("exponential", "none"),
        ("warmup_cosine", "global_norm"),
        ("cosine", "value"),
    ],
)
def test_vmapped_injected_hyperparameters_equal_separate_optimizers(name, schedule, clip):
    configs = [
        _opt(
            name=name,
            schedule=schedule,
            clip=clip,
            warmup_steps=2,
            lr=lr,
            momentum=m,
            clip_value=cv,
            weight_decay=wd,
            decay_rate=rate,
        )
        for lr, m, cv, wd, rate in [
            (0.1, 0.9, 1.0, 1e-3, 0.1),
            (0.5, 0.5, 2.0, 1e-2, 0.5),
            (1e-3, 0.0, 0.5, 1.0, 0.01),
        ]
    ]
    assert len({optim.structure(c) for c in configs}) == 1
    values = {k: jnp.array([optim.hyperparams(c)[k] for c in configs]) for k in optim.INJECTED}
    tx, _ = optim.make_optimizer(configs[0], 10)

    def run(vals):
        state = optim.make_optimizer(configs[0], 10, vals)[0].init(PARAMS)
        out = []
        for _ in range(3):
            u, state = tx.update(GRADS, state, PARAMS)  # values come from the state
            out.append(u)
        return out

    batched = jax.vmap(run)(values)
    for i, c in enumerate(configs):
        for got, want in zip(batched, _updates(optim.make_optimizer(c, 10)[0]), strict=True):
            jax.tree.map(
                lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6), got, want
            )


def test_schedules_equal_optax_references():
    c = _opt(lr=0.3, decay_rate=0.2, warmup_steps=10, boundaries=(0.5, 0.5, 0.75))
    references = {
        "warmup_cosine": optax.warmup_cosine_decay_schedule(0.0, 0.3, 10, 100),
        "exponential": optax.exponential_decay(0.3, 100, 0.2),
        "step": optax.piecewise_constant_schedule(0.3, {50: 0.2 * 0.2, 75: 0.2}),
        "cosine": optax.cosine_decay_schedule(0.3, 100),
    }
    for name, reference in references.items():
        ours = optim.make_schedule(dataclasses.replace(c, schedule=name), 100)
        for t in range(0, 101, 7):
            np.testing.assert_allclose(ours(t), reference(t), rtol=1e-6, atol=1e-9, err_msg=name)

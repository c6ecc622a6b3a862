"""Optimizer config to an optax chain: clipping, weight decay, optimizer, schedule."""

from __future__ import annotations

from collections.abc import Callable

import optax

from bnlab.config import OptConfig

Schedule = Callable[[int], float]


def _sgd(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.sgd(lr)


def _momentum(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.sgd(lr, momentum=c.momentum)


def _nesterov(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.sgd(lr, momentum=c.momentum, nesterov=True)


def _adam(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)


def _adamw(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)


def _rmsprop(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.rmsprop(lr, decay=c.decay, eps=c.eps, momentum=c.rmsprop_momentum or None)


def _adagrad(c: OptConfig, lr) -> optax.GradientTransformation:
    return optax.adagrad(lr, eps=c.eps)


OPTIMIZERS: dict[str, Callable[[OptConfig, Schedule], optax.GradientTransformation]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adam": _adam,
    "adamw": _adamw,
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
}


def _step(c: OptConfig, total_steps: int) -> Schedule:
    bounds: dict[int, float] = {}
    for b in c.boundaries:  # boundaries that fall on the same step multiply
        step = int(b * total_steps)
        bounds[step] = bounds.get(step, 1.0) * c.decay_rate
    return optax.piecewise_constant_schedule(c.lr, bounds)


SCHEDULES: dict[str, Callable[[OptConfig, int], Schedule]] = {
    "constant": lambda c, total: optax.constant_schedule(c.lr),
    "step": _step,
    "exponential": lambda c, total: optax.exponential_decay(c.lr, total, c.decay_rate),
    "cosine": lambda c, total: optax.cosine_decay_schedule(c.lr, total),
    "warmup_cosine": lambda c, total: optax.warmup_cosine_decay_schedule(
        0.0, c.lr, c.warmup_steps, total
    ),
}

CLIPS: dict[str, Callable[[OptConfig], optax.GradientTransformation]] = {
    "none": lambda c: optax.identity(),
    "global_norm": lambda c: optax.clip_by_global_norm(c.clip_value),
    "value": lambda c: optax.clip(c.clip_value),
}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def make_schedule(c: OptConfig, total_steps: int) -> Schedule:
    """The learning rate as a function of the step."""
    return _lookup(SCHEDULES, "schedule", c.schedule)(c, max(int(total_steps), 1))


def make_optimizer(c: OptConfig, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
    """`clip -> weight decay -> optimizer(schedule)`, and the schedule for logging."""
    schedule = make_schedule(c, total_steps)
    clip = _lookup(CLIPS, "clip", c.clip)(c)
    optimizer = _lookup(OPTIMIZERS, "optimizer", c.name)(c, schedule)
    # adamw decays weights itself (decoupled); the others get L2 added to the gradient.
    coupled = c.weight_decay > 0 and c.name != "adamw"
    decay = optax.add_decayed_weights(c.weight_decay) if coupled else optax.identity()
    return optax.chain(clip, decay, optimizer), schedule

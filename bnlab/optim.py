"""Optimizer config to an optax chain: clipping, weight decay, optimizer, schedule, and which
parameters it trains (`opt.trainable`).

The numeric hyperparameters that sweeps vary sit in the optimizer state through
`optax.inject_hyperparams`, so one compiled program serves many of their values. JAX and optax
load when a chain is first built: the `opt` config group validates without them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bnlab import schema
from bnlab.nn.model_config import NORM_MODULE
from bnlab.schema import ConfigError, field

if TYPE_CHECKING:
    from jax.typing import ArrayLike


class _OnFirstUse:
    """A module imported when one of its names is first read (this module's own, not in
    `sys.modules` until then)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


jax = _OnFirstUse("jax")
jnp = _OnFirstUse("jax.numpy")
optax = _OnFirstUse("optax")
optax_contrib = _OnFirstUse("optax.contrib")

Schedule = Callable[[int], float]


def _fractions(boundaries) -> str | None:
    ok = all(0.0 < b < 1.0 for b in boundaries)
    return None if ok else "must be fractions of training in (0, 1)"


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """The `opt` group: optimizer, learning-rate schedule, clipping and weight decay."""

    name: str = field("momentum", "optimizer", choices=lambda: OPTIMIZERS)
    lr: float = field(0.05, "peak learning rate", check=schema.positive)
    momentum: float = field(
        0.9, "momentum / nesterov: momentum coefficient", check=schema.unit_interval_open
    )
    rmsprop_momentum: float = field(
        0.0, "rmsprop: momentum coefficient (0: none)", check=schema.unit_interval_open
    )
    b1: float = field(0.9, "adam/adamw first-moment decay", check=schema.unit_interval_open)
    b2: float = field(0.999, "adam/adamw second-moment decay", check=schema.unit_interval_open)
    eps: float = field(
        1e-8, "adam/adamw/rmsprop/adagrad denominator epsilon", check=schema.positive
    )
    decay: float = field(0.9, "rmsprop squared-gradient decay", check=schema.unit_interval_open)
    weight_decay: float = field(
        0.0, "L2 factor added to the gradient (decoupled for adamw)", check=schema.non_negative
    )
    schedule: str = field("constant", "learning-rate schedule", choices=lambda: SCHEDULES)
    boundaries: tuple[float, ...] = field(
        (0.5, 0.75), "step: fractions of training where lr *= decay_rate", check=_fractions
    )
    decay_rate: float = field(
        0.1,
        "step: factor per boundary; exponential: factor over the whole run",
        check=schema.positive,
    )
    warmup_steps: int = field(
        0, "warmup_cosine: linear warmup length in steps", check=schema.non_negative
    )
    plateau_patience: int = field(
        3,
        "plateau: epochs without a relative improvement of the validation loss before the lr "
        "drops by decay_rate",
        check=schema.at_least(1),
    )
    plateau_threshold: float = field(
        1e-3,
        "plateau: the relative decrease of the validation loss that counts as an improvement",
        check=lambda v: None if 0.0 < v <= 1.0 else "must lie in (0, 1]",
    )
    plateau_cooldown: int = field(
        0, "plateau: epochs after a drop before stalls count again", check=schema.non_negative
    )
    plateau_min_scale: float = field(
        1e-3,
        "plateau: the floor of the lr's scale (a multiple of opt.lr)",
        check=schema.non_negative,
    )
    clip: str = field(
        "none",
        "gradient clipping: none | global_norm | value | adaptive (unit-wise, Brock et al. 2021)",
        choices=lambda: CLIPS,
    )
    clip_value: float = field(
        1.0,
        'max global norm ("global_norm"), max |g| ("value"), or max unit-wise gradient/weight '
        'norm ratio ("adaptive")',
        check=schema.positive,
    )
    trainable: str = field(
        "all",
        'parameters the optimizer moves: "all" | "norm" (only the normalization layers\' own, '
        "e.g. BN's gamma and beta; every other parameter keeps its initial value, Frankle et "
        "al. 2021)",
        choices=lambda: TRAINABLE,
    )


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


def _constant(c: OptConfig, total: int) -> Schedule:
    return optax.constant_schedule(c.lr)


def _step(c: OptConfig, total: int) -> Schedule:
    # Boundaries that fall on the same step multiply; written out (not optax's piecewise
    # schedule) so that `lr` and `decay_rate` may be traced values of a vmapped sweep.
    counts = collections.Counter(int(b * total) for b in c.boundaries)

    def schedule(count):
        factor = 1.0
        for step, n in sorted(counts.items()):
            factor = factor * jnp.where(count >= step, c.decay_rate**n, 1.0)
        return c.lr * factor

    return schedule


def _exponential(c: OptConfig, total: int) -> Schedule:
    # optax.exponential_decay's closed form, without its Python checks on decay_rate (traced).
    return lambda count: c.lr * jnp.power(c.decay_rate, jnp.asarray(count, jnp.float32) / total)


def _warmup_cosine(c: OptConfig, total: int) -> Schedule:
    # optax.warmup_cosine_decay_schedule(0, lr, warmup, total), built from parts that accept a
    # traced `lr` (the composite checks its values in Python).
    warmup = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    decay = optax.cosine_decay_schedule(c.lr, max(total - c.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


SCHEDULES: dict[str, Callable[[OptConfig, int], Schedule]] = {
    "constant": _constant,
    # The lr itself is constant; the chain's last element scales the updates by a factor that
    # drops at epoch ends when the validation loss stalls (`plateau_step`).
    "plateau": _constant,
    "step": _step,
    "exponential": _exponential,
    "cosine": lambda c, total: optax.cosine_decay_schedule(c.lr, total),
    "warmup_cosine": _warmup_cosine,
}

CLIPS: dict[str, Callable[[OptConfig], optax.GradientTransformation]] = {
    "none": lambda c: optax.identity(),
    "global_norm": lambda c: optax.clip_by_global_norm(c.clip_value),
    "value": lambda c: optax.clip(c.clip_value),
    # Adaptive gradient clipping (Brock et al. 2021), the normalizer-free networks' substitute for
    # BN: each unit's gradient norm is capped at clip_value times its weight norm (optax's
    # unit-wise definition).
    "adaptive": lambda c: optax.adaptive_grad_clip(c.clip_value),
}

# Numeric hyperparameters that live in the optimizer state (`optax.inject_hyperparams`): trials
# that differ only in these (and the seed) share one compiled program, vmapped over the state.
INJECTED = ("lr", "momentum", "clip_value", "decay_rate", "weight_decay")


def _plateau(c: OptConfig, factor: float) -> optax.GradientTransformationExtraArgs:
    return optax_contrib.reduce_on_plateau(
        factor=factor,
        patience=c.plateau_patience,
        rtol=c.plateau_threshold,
        cooldown=c.plateau_cooldown,
        min_scale=c.plateau_min_scale,
    )


def _plateau_scaling() -> optax.GradientTransformation:
    """Scales the updates by the plateau state's `scale`; the state changes only at epoch ends
    (`plateau_step`), so every step of an epoch uses one learning rate.

    optax's `contrib.reduce_on_plateau` holds the state and the decision rule, but its update
    expects the monitored value at every call: in the scanned epoch there is none (the
    validation loss exists at epoch ends), so the steps only read its scale here and
    `plateau_step` calls optax's update once per epoch.
    """

    def init(params):
        return _plateau(OptConfig(schedule="plateau"), 0.5).init(params)

    def update(updates, state, params=None):
        del params  # the scale alone decides
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def _is_plateau(x) -> bool:
    return isinstance(x, optax_contrib.ReduceLROnPlateauState)


def plateau_step(opt_state: optax.OptState, value: ArrayLike, c: OptConfig) -> optax.OptState:
    """`opt_state` after one epoch whose validation loss is `value`: optax's
    reduce-on-plateau rule (patience, relative threshold, cooldown, floor) with factor
    `c.decay_rate`. A state without a plateau element is returned unchanged."""
    plateau = _plateau(c, float(c.decay_rate))

    def step(state):
        if not _is_plateau(state):
            return state
        return plateau.update(updates={}, state=state, value=value)[1]

    return jax.tree.map(step, opt_state, is_leaf=_is_plateau)


def lr_scale(opt_state: optax.OptState) -> jax.Array:
    """The factor that reduce-on-plateau applies to the learning rate now (1 without it)."""
    scales = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(s)]
    return jnp.asarray(scales[0] if scales else 1.0, jnp.float32)


# `opt.trainable` -> whether a parameter, named by the module names on its path, is trained.
TRAINABLE: dict[str, Callable[[tuple[str, ...]], bool]] = {
    "all": lambda names: True,
    # The models name every normalization layer NORM_MODULE, whatever the registered norm.
    "norm": lambda names: NORM_MODULE in names,
}


def _path_names(path) -> tuple[str, ...]:
    """The module and variable names of a pytree path (dict keys, NNX attributes)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_labels(c: OptConfig, params: Any) -> Any:
    """`params`' tree with "train" at each leaf that `c.trainable` trains, "frozen" elsewhere.

    Raises:
      ConfigError: if no leaf is trained (e.g. `opt.trainable=norm` with `model.norm=none`).
    """
    trains = _lookup(TRAINABLE, "opt.trainable", c.trainable)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if trains(_path_names(path)) else "frozen", params
    )
    if "train" not in jax.tree.leaves(labels):
        raise ConfigError(
            f"opt.trainable={c.trainable!r}: the model has no parameter it trains (no "
            f"normalization layer, module {NORM_MODULE!r}, owns one, as with model.norm=none "
            "or batchnorm_noaffine), so nothing would train; set opt.trainable=all, or a "
            "model.norm with a scale and bias (e.g. batchnorm)."
        )
    return labels


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def make_schedule(c: OptConfig, total_steps: int) -> Schedule:
    """The learning rate as a function of the step (`c.lr`, `c.decay_rate` may be traced)."""
    return _lookup(SCHEDULES, "schedule", c.schedule)(c, max(int(total_steps), 1))


def depends_on_length(c: OptConfig) -> bool:
    """Whether the schedule's learning rate at a step depends on the run's total step count
    (cosine, step, exponential and warmup-cosine do; constant and plateau do not): a run that
    changes its length mid-way would then jump to another curve. Read off the schedule itself,
    so a schedule registered in `SCHEDULES` needs no declaration."""
    short = 2 * c.warmup_steps + 1000
    steps = [round(i * (short - 1) / 63) for i in range(64)]
    a, b = make_schedule(c, short), make_schedule(c, 2 * short)
    return any(float(a(s)) != float(b(s)) for s in steps)


def hyperparams(c: OptConfig) -> dict[str, float]:
    """The injected hyperparameters of `c`, by name."""
    return {k: getattr(c, k) for k in INJECTED}


def structure(c: OptConfig) -> OptConfig:
    """`c` with the injected hyperparameters blanked, except what changes the chain's shape:
    two configs with equal structures give optimizer states of one pytree structure."""
    blank = dict.fromkeys(INJECTED, 0.0)
    # L2 is a chain element only when weight_decay > 0 (adamw always carries its own).
    blank["weight_decay"] = float(c.weight_decay > 0)
    return dataclasses.replace(c, **blank)


def make_optimizer(
    c: OptConfig, total_steps: int, values: dict[str, ArrayLike] | None = None
) -> tuple[optax.GradientTransformation, Schedule]:
    """`clip -> weight decay -> optimizer(schedule)` with the `INJECTED` hyperparameters in
    its state, and the schedule for logging.

    `values` (default: those of `c`) sets the injected hyperparameters; they may be traced,
    e.g. one per trial under `vmap`. The chain's shape comes from `c` alone. With
    `c.trainable` other than "all", the whole chain sees only the trained parameters
    (`optax.multi_transform`), and the others get zero updates (`optax.set_to_zero`): no
    clipping, weight decay or momentum moves them.
    """
    values = hyperparams(c) if values is None else values
    make_clip = _lookup(CLIPS, "clip", c.clip)
    make_opt = _lookup(OPTIMIZERS, "optimizer", c.name)
    _lookup(SCHEDULES, "schedule", c.schedule)
    # adamw decays weights itself (decoupled); the others get L2 added to the gradient.
    coupled = c.weight_decay > 0 and c.name != "adamw"

    def chain(lr, momentum, clip_value, decay_rate, weight_decay):  # the INJECTED names
        ch = dataclasses.replace(
            c,
            lr=lr,
            momentum=momentum,
            clip_value=clip_value,
            decay_rate=decay_rate,
            weight_decay=weight_decay,
        )
        clip = make_clip(ch)
        decay = optax.add_decayed_weights(ch.weight_decay) if coupled else optax.identity()
        parts = [clip, decay, make_opt(ch, make_schedule(ch, total_steps))]
        if c.schedule == "plateau":
            parts.append(_plateau_scaling())
        if c.trainable == "all":
            return optax.chain(*parts)
        return optax.multi_transform(
            {"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
            functools.partial(trainable_labels, c),
        )

    tx = optax.inject_hyperparams(chain)(**values)
    schedule = make_schedule(dataclasses.replace(c, **values), total_steps)
    return tx, schedule


def lr_now(c: OptConfig, opt_state: optax.OptState, step: ArrayLike, total_steps: int) -> jax.Array:
    """The learning rate in force at `step`, as the training records log it: the schedule of the
    state's injected hyperparameters (one trial's under `vmap`) times reduce-on-plateau's scale."""
    injected = getattr(opt_state, "hyperparams", None) or {}
    values = {k: injected[k] for k in INJECTED if k in injected}
    schedule = make_schedule(dataclasses.replace(c, **values), total_steps)
    return jnp.asarray(schedule(step), jnp.float32) * lr_scale(opt_state)

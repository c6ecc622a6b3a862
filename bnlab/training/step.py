"""One training step: the explicit train state, the model a config builds, the pure `train_step`.

`bnlab.training.train` scans it over epochs; `jit`/`pmap`/`vmap` are applied by the callers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnlab import data as data_lib
from bnlab import optim
from bnlab.config import Config, ConfigError
from bnlab.nn import model_config, models, norms, recalibrate
from bnlab.training import parallel
from bnlab.types import Array, BatchStats, Params

Metrics = dict[str, Array]


class TrainState(NamedTuple):
    step: Array  # int32[], optimizer steps taken
    params: Params
    batch_stats: BatchStats  # running statistics of every BN layer ({} without BN)
    opt_state: optax.OptState


def build_model(cfg: Config) -> nn.Module:
    """The model that `cfg.model`/`cfg.norm` describe, with its normalization layer injected
    (BN statistics across the devices that `cfg.parallel` names), and the normalization of its
    kernels for a normalization of weights (`NormSpec.kernel`)."""
    m, par = cfg.model, cfg.parallel
    axis = {}
    if par.mode != "none":
        devices = parallel.device_count(par, cfg.train.batch_size)
        axis = parallel.bn_axis(par, devices)
        per_device = cfg.train.batch_size // devices
        widths = model_config.norm_widths(m)
        problems = norms.problems(cfg, widths=widths, per_device_batch=per_device)
        if problems:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    norm = norms.build(cfg, axis)
    kwargs = {"dropout": m.dropout}
    kwargs |= {"conv_impl": m.conv_impl, "dropout_conv": m.dropout_conv} if m.name == "cnn" else {}
    kwargs |= {"hidden": model_config.norm_widths(m)} if m.name == "mlp" else {}
    return models.MODELS[m.name](
        norm=norm,
        kernel_norm=norms.build_kernel(cfg),
        num_classes=data_lib.num_classes(cfg.data.task),
        act=models.ACTIVATIONS[m.activation],
        placement=m.placement,
        kernel_init=models.INITS[m.init](m.init_std),
        **kwargs,
    )


def norm_metrics(cfg: Config) -> Callable[[Array], Metrics] | None:
    """The normalization's per-step values to log (`NormSpec.step_metrics`), or None."""
    spec = norms.get(cfg.model.norm)
    if spec.step_metrics is None:
        return None
    return functools.partial(spec.step_metrics, cfg.norm)


def stats_refresh(
    cfg: Config, model: nn.Module
) -> Callable[[TrainState, Array, Array], TrainState] | None:
    """For a normalization whose statistics come from the data (`NormSpec.refresh`): `(state,
    images, index) -> state` that, at the epoch's step `index` 0 and every `K`-th after it,
    replaces the running statistics by the exact moments of each layer's inputs over the first
    `N` examples of `images` (the whole training split, uint8) with the step's weights
    (`bnlab.nn.recalibrate`), before the step trains. None for any other normalization.

    The condition reads the step's index within the epoch, the same for every trial of a
    vmapped group, so that the refresh stays a branch taken at those steps alone (a per-trial
    condition would compute it at every step).
    """
    spec = norms.get(cfg.model.norm)
    if spec.refresh is None:
        return None
    every, n = spec.refresh(cfg.norm)
    chunk = max(d for d in range(1, min(n, 1000) + 1) if n % d == 0)

    def refresh(state: TrainState, images: Array, index: Array) -> TrainState:
        if images.shape[0] < n:
            raise ConfigError(
                f"norm.refresh_examples={n} exceeds the {images.shape[0]} training examples; "
                "lower it or raise data.train_size"
            )
        sample = data_lib.to_float(images[:n])

        def fresh(batch_stats):
            variables = {"params": state.params, "batch_stats": batch_stats}
            return recalibrate.recalibrate(model, variables, sample, batch_size=chunk)

        stats = lax.cond(index % every == 0, fresh, lambda s: s, state.batch_stats)
        return state._replace(batch_stats=stats)

    refresh.examples = n  # type: ignore[attr-defined]  # the first N images are all it reads
    return refresh


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, key: Array, sample: Array
) -> TrainState:
    """Initial state from a sample batch (statistics start at mean 0, variance 1)."""
    variables = model.init(key, sample, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def cross_entropy(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    state: TrainState,
    batch: tuple[Array, Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Callable[[Array], Array],
    axis_name: str | None = None,
    average_stats: bool = False,
    rng: Array | None = None,
    extra_metrics: Callable[[Array], Metrics] | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on `batch = (images f32[B,28,28,1], labels i32[B])`.

    With `axis_name`, `batch` is this device's part of the global batch: gradients and metrics
    are averaged over the devices (equal parts), so every device applies the same update.
    `average_stats` averages per-device ("local"/ghost) running statistics in the same
    collective: the moving average is linear, so this equals averaging them only before
    evaluation, and every device holds the same state after every step.
    `rng` is the run's key for layers with randomness; this step's keys derive from it and the
    step count (`step_rngs`), so nothing random is stored in the state. `extra_metrics(step)`
    adds values to log (e.g. a normalization's schedule).
    """
    images, labels = batch
    rngs = {} if rng is None else step_rngs(rng, state.step, axis_name)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return cross_entropy(logits, labels), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    if axis_name is not None:
        stats = batch_stats if average_stats else {}
        grads, loss, accuracy, stats = lax.pmean((grads, loss, accuracy, stats), axis_name)
        batch_stats = stats if average_stats else batch_stats
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "grad_norm": global_norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32) * optim.lr_scale(state.opt_state),
    }
    if extra_metrics is not None:
        metrics.update(extra_metrics(state.step))
    return TrainState(state.step + 1, params, batch_stats, opt_state), metrics


SMALL_LEAF = 1 << 14  # elements: smaller leaves are reduced together in `global_norm`


def global_norm(tree) -> Array:
    """The global L2 norm `sqrt(sum over leaves of sum(x**2))`, as `optax.tree.norm`, in a
    few kernels.

    XLA:CPU runs each reduction as its own kernels (three for a small vector, after its
    pairwise rewrite), so a leaf-by-leaf norm of the Fig. 1 MLP's 14 gradients launched about
    40 kernels per step, 10-20% of the step. The leaves under `SMALL_LEAF` elements are
    concatenated and reduced at once; copying them costs less than the launches it saves,
    while a large leaf is reduced where it lies.

    Args:
      tree: a pytree of arrays (e.g. gradients); any float dtype, summed in float32.

    Returns:
      `f32[]`, 0 for an empty tree.
    """
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    small = [x for x in leaves if x.size < SMALL_LEAF]
    sums = [jnp.sum(jnp.square(x)) for x in leaves if x.size >= SMALL_LEAF]
    if small:
        sums.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(sums, jnp.zeros((), jnp.float32)))


def step_rngs(rng: Array, step: Array, axis_name: str | None = None) -> dict[str, Array]:
    """The rng streams of one training step: `noise` (noisy normalizations) is the same on every
    device, so a layer can draw it for the global batch; `dropout` differs per device."""
    key = jax.random.fold_in(rng, step)
    noise, dropout = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    if axis_name is not None:
        dropout = jax.random.fold_in(dropout, lax.axis_index(axis_name))
    return {"noise": noise, "dropout": dropout}

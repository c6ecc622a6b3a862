"""What several diagnostics share: the loss on the fixed batch, the order of layers, rngs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.custom_batching import custom_vmap

from bnlab.diagnostics.fields import split_names  # noqa: F401 - shared by the diagnostics
from bnlab.types import Array, Params

# Small LAPACK decompositions, one matrix at a time however they are vmapped. jaxlib's CPU kernels
# split a batch of matrices over XLA's intra-op thread pool and wait for the parts; two such
# batched calls running at once on a 2-thread pool (a vmapped sweep measuring `hessian` and
# `hessian_data`, say) each hold a worker while waiting for the other's: the run hung at 0% CPU.
# A batch is instead a loop (`lax.map`) of unbatched calls, which wait for nothing.


@custom_vmap
def eigh(a: Array) -> tuple[Array, Array]:
    """`jnp.linalg.eigh(a)` of one symmetric matrix `a f32[m, m]`: `(eigenvalues ascending,
    eigenvectors as columns)`; vmapped, one matrix after the other."""
    w, v = jnp.linalg.eigh(a)
    return w, v


@eigh.def_vmap
def _eigh_batched(axis_size, in_batched, a):
    del axis_size
    if not in_batched[0]:
        return eigh(a), (False, False)
    return lax.map(eigh, a), (True, True)


@custom_vmap
def singular_values(x: Array) -> Array:
    """`jnp.linalg.svd(x, compute_uv=False)` of one matrix; vmapped, one after the other."""
    return jnp.linalg.svd(x, compute_uv=False)


@singular_values.def_vmap
def _singular_values_batched(axis_size, in_batched, x):
    del axis_size
    if not in_batched[0]:
        return singular_values(x), False
    return lax.map(singular_values, x), True


def measurement_rngs(key: Array) -> dict[str, Array]:
    """The rng streams of one measurement, as a training step names them: every evaluation of
    the loss within a measurement sees the same noise, so that only the weights differ."""
    return {"noise": jax.random.fold_in(key, 0), "dropout": jax.random.fold_in(key, 1)}


def batch_loss(ctx: Any, *, train: bool = True) -> Callable[[Params], Array]:
    """`params -> mean cross-entropy` of the run's model on `ctx.batch`.

    `train=True` normalizes with the batch's statistics, as a training step does; the updated
    running statistics are discarded, so a measurement never changes the run. `train=False`
    normalizes with the running statistics of `ctx.state`.
    """
    images, labels = ctx.batch
    rngs = measurement_rngs(ctx.rng)
    return model_loss(ctx.model, ctx.state.batch_stats, images, labels, train=train, rngs=rngs)


def model_loss(
    model: nn.Module,
    batch_stats: Any,
    images: Array,
    labels: Array,
    *,
    train: bool,
    rngs: dict[str, Array],
) -> Callable[[Params], Array]:
    """`params -> mean cross-entropy` of `model` on `(images, labels)`, statistics discarded."""

    def loss(params: Params) -> Array:
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=train,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def call_order(model: nn.Module, variables: Any, images: Array) -> tuple[str, ...]:
    """Names of the model's top-level submodules in the order the forward pass calls them.

    The params dict cannot tell: a pytree that went through `jit` or `tree.map` comes back
    with sorted keys (`block0, ..., dense0, ..., head`). Found once per trace, from shapes
    only (`eval_shape`), so it costs nothing at run time.
    """
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = context.module.path
        if len(path) == 1 and path[0] not in order:
            order.append(path[0])
        return next_fun(*args, **kwargs)

    def forward(variables, images):
        with nn.intercept_methods(record):
            return model.apply(variables, images, train=False)

    jax.eval_shape(forward, _shapes(variables), _shapes(images))
    return tuple(order)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def weight_layers(ctx: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`(order, layers)`: the top-level param modules in call order, and those of them that
    hold a `kernel` (the layers "with weights" of Santurkar et al.)."""
    params = ctx.state.params
    variables = {"params": params, "batch_stats": ctx.state.batch_stats}
    order = tuple(n for n in call_order(ctx.model, variables, ctx.batch[0]) if n in params)
    missing = sorted(set(params) - set(order))
    if missing:
        raise ValueError(f"params {missing} belong to no module the forward pass calls.")
    return order, tuple(n for n in order if "kernel" in params[n])


def learning_rate(opt_state: Any) -> Array:
    """The peak learning rate in an optimizer state built by `optax.inject_hyperparams` (as
    `bnlab.optim` builds every optimizer): per trial in a vmapped sweep.

    Raises:
      ValueError: no injected `lr` in the state.
    """
    hyperparams = getattr(opt_state, "hyperparams", None)
    if not hyperparams or "lr" not in hyperparams:
        raise ValueError(
            "this optimizer state has no injected learning rate (optax.inject_hyperparams "
            "with an `lr` argument, as bnlab.optim builds it); give absolute step sizes instead."
        )
    return hyperparams["lr"]

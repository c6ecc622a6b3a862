"""Flax NNX layers over bnlab's pure normalizations, and the map between NNX and linen state.

`BatchNorm` is built and called as `flax.nnx.BatchNorm` is, holds the same variables, and
computes with `bnlab.norm.batch_norm`. `to_linen`/`from_linen` (from `bnlab.nnx_state`) move
a model's variables to and from linen's `{"params": ..., "batch_stats": ...}` dict, so an NNX
model and a linen model with the same module paths share checkpoints and exports. Import it
as `bnlab.nnx`; `import bnlab` does not import NNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors, nnx

from bnlab import norm
from bnlab.nnx_state import (
    LinenVariables,
    dicts_to_states,
    from_linen,
    states_to_dicts,
    to_linen,
)
from bnlab.types import Array

__all__ = [
    "BatchNorm",
    "LinenVariables",
    "dicts_to_states",
    "from_linen",
    "states_to_dicts",
    "to_linen",
]

Initializer = Callable[..., Array]  # (key, shape, dtype) -> array, as flax's initializers


class BatchNorm(nnx.Module):
    """Batch normalization with the constructor, call, variables and switches of
    `flax.nnx.BatchNorm`, computed by `bnlab.norm.batch_norm`.

    In training (`use_running_average=False`) the layer normalizes with the batch's statistics
    (over every axis but `axis`, and over the devices of `axis_name`) and updates its running
    statistics in place (Ioffe & Szegedy 2015, Alg. 1)::

        mu = mean(x)    var = mean((x - mu)**2)    y = (x - mu) / sqrt(var + epsilon) * scale + bias
        mean <- momentum * mean + (1 - momentum) * mu
        var  <- momentum * var  + (1 - momentum) * var_b

    with `var_b = var`, or `var * n / (n - 1)` for `convention="torch"`. In evaluation it
    normalizes with `mean`/`var` and changes nothing. Statistics are float32; the output has
    the dtype of `x` unless `dtype` is set (flax instead promotes bf16 inputs with float32
    parameters). The gradient is the closed form of the paper's Section 3 unless
    `backward="autodiff"`.

    Variables, as in flax (same names, shapes, dtypes, types), so `nnx.state` moves between the
    two unchanged: `scale`, `bias` (`nnx.Param`, absent when `use_scale`/`use_bias` is off) and
    `mean`, `var` (`nnx.BatchStat`, float32, initially 0 and 1).

    Training and evaluation switch as for flax's layer: the `use_running_average` attribute
    (set by the constructor, `model.train()`/`model.eval()`, or `nnx.view(model,
    use_running_average=...)` through `set_view`), overridden by the call's argument.

    Args:
      num_features: the size of the feature axis (a tuple with several feature axes).
      use_running_average: evaluate with the running statistics if True; train if False.
      axis: the feature axis (or axes); statistics are computed over all the others.
      momentum: weight of the old statistics in the moving average (flax convention).
      epsilon: added to the variance; a Python number > 0.
      dtype: the output dtype (default: the dtype of `x`).
      param_dtype: dtype of `scale` and `bias`.
      use_bias: add the learned `bias` (beta).
      use_scale: multiply by the learned `scale` (gamma).
      bias_init: initializer of `bias`.
      scale_init: initializer of `scale`.
      axis_name: a named axis (`shard_map`, `pmap`, `vmap`) to compute statistics across.
      axis_index_groups: groups of indices along `axis_name` that share statistics.
      use_fast_variance: accepted for flax compatibility and ignored: bnlab always computes the
        variance in one pass over shifted data, which is as exact as flax's two-pass variance.
      convention: "flax" (biased running variance) or "torch" (unbiased, as PyTorch stores).
      backward: "analytic" (closed-form custom VJP) or "autodiff".
      rngs: the `nnx.Rngs` that `scale_init`/`bias_init` draw from (stream `params`).
      bias_metadata: metadata of the `bias` Param (e.g. a sharding).
      scale_metadata: metadata of the `scale` Param.

    Raises:
      ValueError: (when called) without a `use_running_average` anywhere, on an input whose
        feature shape differs from `num_features`, or on an unknown `convention`/`backward`.
      flax.errors.TraceContextError: when training inside a transform that captured the model
        in a closure instead of taking it as an argument (the message says how to fix it).
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_fast_variance: bool = True,
        convention: norm.Convention = "flax",
        backward: norm.Backward = "analytic",
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] | None = None,
        scale_metadata: Mapping[str, Any] | None = None,
    ):
        stats = norm.init_stats(num_features)
        self.mean = nnx.BatchStat(stats["mean"])
        self.var = nnx.BatchStat(stats["var"])
        shape = stats["mean"].shape
        # Scale first, then bias: the order in which flax draws their keys.
        self.scale = _affine(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _affine(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.num_features = num_features if isinstance(num_features, int) else shape
        self.use_running_average = use_running_average
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = _frozen(axis_index_groups)
        self.use_fast_variance = use_fast_variance
        self.convention = convention
        self.backward = backward

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes `x`; in training also updates `mean` and `var` in place.

        Args:
          x: the input, any float dtype, with `num_features` on `axis`.
          use_running_average: overrides the attribute of that name for this call.
          mask: per-example weights (`f32[B]` or bool, 0 for padding) or an array broadcastable
            to `x` that is 1 on the feature axes; only the statistics use it.

        Returns:
          The normalized `x`, in `dtype` if set, else in the dtype of `x`.
        """
        use_running_average = _first_set(use_running_average, self.use_running_average)
        training = not use_running_average
        y, new_stats = norm.batch_norm(
            x,
            {"mean": self.mean[...], "var": self.var[...]},
            _value(self.scale),
            _value(self.bias),
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            convention=self.convention,
            backward=self.backward,
            mask=mask,
        )
        if training:
            _write_stats(self, new_stats)
        return y if self.dtype is None else y.astype(self.dtype)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for `nnx.view(model, use_running_average=...)`.

        Args:
          use_running_average: True evaluates with the running statistics, False trains; None
            leaves the mode as it is.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _affine(use, init, shape, param_dtype, rngs, metadata):
    """A learned scale or bias as flax's normalization layers declare it (None when off)."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, param_dtype), **dict(metadata or {}))


def _value(param):
    return None if param is None else param[...]


def _frozen(groups):
    # Hashable, so that the layer's static attributes can key compilation caches.
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)


def _first_set(call_value: bool | None, attribute: bool | None) -> bool:
    if call_value is not None:
        return call_value
    if attribute is not None:
        return attribute
    raise ValueError(
        "BatchNorm: use_running_average is not set. Pass it to the constructor "
        "(BatchNorm(..., use_running_average=False)), to the call (layer(x, "
        "use_running_average=True)), or set it on the whole model with model.train() / "
        "model.eval() or nnx.view(model, use_running_average=...)."
    )


def _write_stats(layer, new_stats) -> None:
    """Stores the updated running statistics in the layer's `BatchStat`s."""
    try:
        # State, not a function of the loss: no gradient may reach it (flax does the same when
        # variables are mutable array references).
        layer.mean[...] = jax.lax.stop_gradient(new_stats["mean"])
        layer.var[...] = jax.lax.stop_gradient(new_stats["var"])
    except errors.TraceContextError as err:
        raise errors.TraceContextError(
            "BatchNorm: training updates the running statistics, but this model was captured by "
            "a transform (a closure such as jax.jit(lambda x: model(x)), or the model itself "
            "passed as the function: nnx.jit(model), nnx.eval_shape(model, x)). Pass the model "
            "as an argument instead (nnx.jit(lambda m, x: m(x))(model, x)), split it with "
            "nnx.split and return nnx.state(model) from a jax transform, or evaluate "
            "(model.eval())."
        ) from err

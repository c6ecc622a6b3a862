"""The NNX `BatchNorm` over `bnlab.ops.batch_norm`, and what every bnlab NNX layer shares.

Built and called as flax's NNX layers are (`num_features`, keyword options, `rngs`), with the
variables of its linen twin `bnlab.nn.layers.BatchNorm`. The variants are in
`bnlab.nn.nnx_variants`; `bnlab.nnx` is where users import them from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors, nnx
from flax.core import scope as linen_scope

from bnlab import ops as norm
from bnlab.types import Array, Stats

Initializer = Callable[..., Array]  # (key, shape, dtype) -> array, as flax's initializers
# What a layer with randomness takes as `rngs`: an nnx.Rngs (its `noise` stream is drawn), one
# stream, or the key itself.
RngsLike = nnx.Rngs | nnx.RngStream | Array | None


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
    parameters; an integer or bool `x` gives float32 in both). The gradient is the closed form
    of the paper's Section 3 unless `backward="autodiff"`.

    Variables, as in flax (same names, shapes, dtypes, types), so `nnx.state` moves between the
    two unchanged: `scale`, `bias` (`nnx.Param`, absent when `use_scale`/`use_bias` is off) and
    `mean`, `var` (`nnx.BatchStat`, float32, initially 0 and 1).

    Training and evaluation switch as for flax's layer: the `use_running_average` attribute
    (set by the constructor, `model.train()`/`model.eval()`, or `nnx.view(model,
    use_running_average=...)` through `set_view`), overridden by the call's argument.

    The variants below subclass it: they override `_normalize` (which pure function) and, with
    more running state, `STATS` (the names of their `nnx.BatchStat`s).

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
      allow_single_value: allow training statistics over one value per feature (refused by
        default, as PyTorch refuses it).
      rngs: the `nnx.Rngs` that `scale_init`/`bias_init` draw from (stream `params`).
      bias_metadata: metadata of the `bias` Param (e.g. a sharding).
      scale_metadata: metadata of the `scale` Param.

    Raises:
      TypeError: `num_features` is not an int (or a tuple of ints); ValueError: one is < 1.
      ValueError: (when called) without a `use_running_average` anywhere, on an input whose
        feature shape differs from `num_features`, or on an unknown `convention`/`backward`.
      flax.errors.TraceContextError: when training inside a transform that captured the model
        in a closure instead of taking it as an argument (the message says how to fix it).
    """

    STATS: tuple[str, ...] = ("mean", "var")  # its nnx.BatchStats, in the call's `stats`

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
        allow_single_value: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] | None = None,
        scale_metadata: Mapping[str, Any] | None = None,
    ):
        _check_num_features(type(self).__name__, num_features, several=True)
        stats = norm.init_stats(num_features)
        self.mean = nnx.BatchStat(stats["mean"])
        self.var = nnx.BatchStat(stats["var"])
        shape = stats["mean"].shape
        # Scale first, then bias: the order in which flax draws their keys.
        self.scale = _affine(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _affine(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.param_dtype, self.use_scale, self.use_bias = param_dtype, use_scale, use_bias
        self.num_features = num_features if isinstance(num_features, int) else shape
        self.use_running_average = use_running_average
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = _frozen(axis_index_groups)
        self.use_fast_variance = use_fast_variance
        self.convention = convention
        self.backward = backward
        self.allow_single_value = allow_single_value

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        rngs: RngsLike = None,
    ) -> Array:
        """Normalizes `x`; in training also updates the running statistics in place.

        Args:
          x: the input, any float dtype (an integer or bool one gives float32, as in flax),
            with `num_features` on `axis`.
          use_running_average: overrides the attribute of that name for this call.
          mask: per-example weights (`f32[B]` or bool, 0 for padding) or an array broadcastable
            to `x` that is 1 on the feature axes; only the statistics use it (`BatchNorm` only).
          rngs: the noise of `NoisyBatchNorm`; the other layers ignore it, so that a model can
            pass it to whichever normalization it holds.

        Returns:
          The normalized `x`, in `dtype` if set, else in the dtype of `x`.
        """
        training = not _first_set(self, use_running_average, self.use_running_average)
        stats = {name: getattr(self, name)[...] for name in self.STATS}
        scale, bias = _value(self.scale), _value(self.bias)
        y, new_stats = self._normalize(
            x, stats, scale, bias, training=training, mask=mask, rngs=rngs
        )
        if training:
            _write_stats(self, new_stats)
        return y if self.dtype is None else y.astype(self.dtype)

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        """`(y, new_stats)` of this layer's pure function; the variants override it."""
        del rngs  # deterministic
        allow = self.allow_single_value
        args = self._bn_args(training)
        return norm.batch_norm(x, stats, scale, bias, mask=mask, allow_single_value=allow, **args)

    def _bn_args(self, training: bool) -> dict[str, Any]:
        """The keyword arguments that every batch-statistics function of `bnlab.norm` takes."""
        return {
            "training": training,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "axis": self.axis,
            "axis_name": self.axis_name,
            "axis_index_groups": self.axis_index_groups,
            "convention": self.convention,
            "backward": self.backward,
        }

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for `nnx.view(model, use_running_average=...)`.

        Args:
          use_running_average: True evaluates with the running statistics, False trains; None
            leaves the mode as it is.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def noise_key(rngs: RngsLike, stream: str = "noise") -> Array | None:
    """The key that `rngs` gives a layer with randomness (None stays None).

    Args:
      rngs: an `nnx.Rngs` (its stream `stream` is drawn, which advances it), an
        `nnx.RngStream` (drawn), or a key (returned as it is).
      stream: the stream of an `nnx.Rngs` to draw.

    Returns:
      A key, or None.
    """
    if isinstance(rngs, nnx.Rngs):
        return rngs[stream]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs


def linen_rng(key: Array, *path: str) -> Array:
    """The key that linen's `make_rng` returns at its first call in the module at `path`
    (e.g. `"block0", "norm"`) of a model applied with `rngs={stream: key}`.

    linen folds the module path and a per-module call count into the stream's key; an NNX
    model that passes each layer this key draws what its linen twin draws.

    Args:
      key: the key given to linen's `apply` for the stream.
      *path: the names of the modules from the root to the one that draws.

    Returns:
      The derived key.
    """
    return linen_scope.LazyRng.create(key, *path, 1).as_jax_rng()


def _check_num_features(layer: str, num_features: Any, *, several: bool = False) -> None:
    """Refuses a `num_features` that is not a positive int (with `several`, or a non-empty tuple
    of them), which flax's NNX layers refuse too, with an error that says what it must be."""
    sizes = tuple(num_features) if several and isinstance(num_features, Sequence) else None
    wanted = "a positive int, the size of the feature axis"
    wanted += " (or a tuple of them, one per feature axis)" if several else ""
    for n in sizes or (num_features,):
        if not isinstance(n, Integral) or isinstance(n, bool):
            raise TypeError(f"{layer}: num_features must be {wanted}; got {num_features!r}.")
        if n < 1:
            raise ValueError(f"{layer}: num_features must be {wanted}; got {num_features!r}.")


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


def _refuse_mask(layer, mask) -> None:
    if mask is not None:
        raise ValueError(
            f"{type(layer).__name__}: mask is supported by BatchNorm only (bnlab.norm.batch_norm)."
        )


def _first_set(layer, call_value: bool | None, attribute: bool | None) -> bool:
    if call_value is not None:
        return call_value
    if attribute is not None:
        return attribute
    name = type(layer).__name__
    raise ValueError(
        f"{name}: use_running_average is not set. Pass it to the constructor "
        f"({name}(..., use_running_average=False)), to the call (layer(x, "
        "use_running_average=True)), or set it on the whole model with model.train() / "
        "model.eval() or nnx.view(model, use_running_average=...)."
    )


def _write_stats(layer, new_stats: Stats) -> None:
    """Stores the updated running state in the layer's `BatchStat`s."""
    try:
        for name, value in new_stats.items():
            # State, not a function of the loss: no gradient may reach it (flax does the same
            # when variables are mutable array references).
            getattr(layer, name)[...] = jax.lax.stop_gradient(value)
    except errors.TraceContextError as err:
        raise errors.TraceContextError(
            f"{type(layer).__name__}: training updates the running statistics, but this model "
            "was captured by a transform (a closure such as jax.jit(lambda x: model(x)), or the "
            "model itself passed as the function: nnx.jit(model), nnx.eval_shape(model, x)). "
            "Pass the model as an argument instead (nnx.jit(lambda m, x: m(x))(model, x)), "
            "split it with nnx.split and return nnx.state(model) from a jax transform, or "
            "evaluate (model.eval())."
        ) from err

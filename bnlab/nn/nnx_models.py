"""The reference CNN and the paper's MLP in Flax NNX, with the module paths of `bnlab.models`.

Their state maps one-to-one onto the linen models' variables (`bnlab.nnx.to_linen`/
`from_linen`): `conv0/kernel` (HWIO), `conv0/bias`, `block0/norm/scale`, ..., `dense/kernel`,
`head/bias`, and `batch_stats/block0/norm/mean`, ... As in linen, the normalization is
injected: any registered one through `bnlab.nnx.norm_factory(cfg)` (and, for a normalization of
weights, `bnlab.nnx.kernel_norm_factory(cfg)`, held by the layers before each site as `norm`:
`dense0/norm/scale`), or `build_model(cfg)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnlab import data as data_lib
from bnlab.nn import model_config, models
from bnlab.nn import nnx as bnlab_nnx
from bnlab.schema import ConfigError
from bnlab.types import Array

# `norm(num_features, rngs=...)` -> a layer called as `layer(x)` (and `layer(x, rngs=key)` when
# the model's call gets `rngs`), e.g. `bnlab.nnx.BatchNorm`,
# `functools.partial(bnlab.nnx.BatchNorm, momentum=0.9)` or `bnlab.nnx.norm_factory(cfg)`.
NormFactory = Callable[..., Callable[..., Array]]
# `kernel_norm(initial_kernel, rngs=...)` -> a module called as `module(kernel) -> kernel`, e.g.
# `bnlab.nnx.WeightNorm` or `bnlab.nnx.kernel_norm_factory(cfg)`; None: plain kernels.
KernelNormFactory = Callable[..., Callable[[Array], Array]]
LECUN_NORMAL = nnx.initializers.lecun_normal()  # the default kernel init, as in linen


class Conv(nnx.Module):
    """Stride-1 SAME convolution with the variables of `bnlab.models.Conv`: `kernel` HWIO, `bias`.

    `impl` as there: "im2col" (one matmul; fast on CPU, also inside `lax.scan`) or "xla".
    A `kernel_norm` reparameterizes the kernel, held as `norm` (linen's `Conv`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: tuple[int, int] = (3, 3),
        kernel_init: Callable = LECUN_NORMAL,
        impl: str = "im2col",
        kernel_norm: KernelNormFactory | None = None,
        rngs: nnx.Rngs,
    ):
        if impl not in models.CONV_IMPLS:
            raise ValueError(f"Conv: unknown impl {impl!r}; use one of {models.CONV_IMPLS}.")
        shape = (*kernel_size, in_features, out_features)
        kernel = kernel_init(rngs.params(), shape, jnp.float32)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.impl = impl
        self.norm = None if kernel_norm is None else kernel_norm(kernel, rngs=rngs)

    def __call__(self, x_BxHxWxC: Array) -> Array:
        kernel = self.kernel[...] if self.norm is None else self.norm(self.kernel[...])
        return models.conv_same(x_BxHxWxC, kernel, self.impl) + self.bias[...]


class Linear(nnx.Module):
    """`nnx.Linear`'s variables (`kernel` [I, O], `bias`) and product, with the kernel
    reparameterized by `kernel_norm(initial_kernel, rngs=rngs)`, held as `norm` (linen's
    `models.Dense`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_norm: KernelNormFactory,
        kernel_init: Callable = LECUN_NORMAL,
        rngs: nnx.Rngs,
    ):
        kernel = kernel_init(rngs.params(), (in_features, out_features), jnp.float32)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.norm = kernel_norm(kernel, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        kernel = self.norm(self.kernel[...])
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + self.bias[...]


def linear(
    in_features: int,
    out_features: int,
    *,
    kernel_init: Callable,
    kernel_norm: KernelNormFactory | None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The dense layer that feeds a normalization site (linen's `models.dense`): flax's
    `nnx.Linear`, or `Linear` when a kernel normalization reparameterizes its kernel."""
    if kernel_norm is None:
        return nnx.Linear(in_features, out_features, kernel_init=kernel_init, rngs=rngs)
    return Linear(in_features, out_features, kernel_init=kernel_init, kernel_norm=kernel_norm,
                  rngs=rngs)  # fmt: skip


class NormAct(nnx.Module):
    """Normalization and nonlinearity in the order that `placement` names (linen's `_NormAct`).

    `name` is the block's name in the model (linen's module path), from which the noise of a
    normalization with randomness derives as linen derives it (`bnlab.nnx.linen_rng`).
    """

    def __init__(
        self, norm: Callable[..., Array], act: Callable, placement: str = "before", *, name: str
    ):
        if placement not in models.PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; known: {models.PLACEMENTS}")
        self.norm = norm
        self.act = act
        self.placement = placement
        self.name = name

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """`key`: the model call's noise key (None: the normalization is called without one)."""
        kwargs = {} if key is None else {"rngs": bnlab_nnx.linen_rng(key, self.name, "norm")}
        if self.placement == "before":
            return self.act(self.norm(x, **kwargs))
        return self.norm(self.act(x), **kwargs)


class MLP(nnx.Module):
    """Ioffe & Szegedy (2015) Fig. 1 network, as `bnlab.models.MLP`: 784-100-100-100-10,
    sigmoid by default, the normalization in each hidden block (none by default).

    Args:
      norm: the normalization factory, `norm(num_features, rngs=rngs)`.
      kernel_norm: the kernel normalization of each hidden layer, or None.
      hidden: the widths of the hidden layers.
      num_classes: outputs of the head.
      act: the nonlinearity.
      placement: normalization "before" or "after" the nonlinearity.
      kernel_init: initializer of every kernel (biases start at 0).
      image_shape: the shape of one input example, flattened by the first layer.
      rngs: the `nnx.Rngs` that initialize the variables.
    """

    def __init__(
        self,
        *,
        norm: NormFactory = bnlab_nnx.Identity,
        kernel_norm: KernelNormFactory | None = None,
        hidden: Sequence[int] = models.MLP.hidden,
        num_classes: int = 10,
        act: Callable[[Array], Array] = nnx.sigmoid,
        placement: str = "before",
        kernel_init: Callable = LECUN_NORMAL,
        image_shape: tuple[int, ...] = (28, 28, 1),
        rngs: nnx.Rngs,
    ):
        widths = (math.prod(image_shape), *hidden)
        self.depth = len(hidden)
        for i in range(self.depth):
            kw = {"kernel_init": kernel_init, "kernel_norm": kernel_norm, "rngs": rngs}
            dense = linear(widths[i], widths[i + 1], **kw)
            setattr(self, f"dense{i}", dense)
            block = NormAct(norm(widths[i + 1], rngs=rngs), act, placement, name=f"block{i}")
            setattr(self, f"block{i}", block)
        self.head = nnx.Linear(widths[-1], num_classes, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x: Array, *, rngs: bnlab_nnx.RngsLike = None) -> Array:
        """The logits of `x`; `rngs`: the step's noise (`bnlab.nnx.NoisyBatchNorm`)."""
        key = bnlab_nnx.noise_key(rngs)
        x = x.reshape((x.shape[0], -1))
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(getattr(self, f"dense{i}")(x), key=key)
        return self.head(x)


class CNN(nnx.Module):
    """Reference CNN: conv3x3(32)-N-relu-avgpool2, conv3x3(64)-N-relu-avgpool2,
    dense(256)-N-relu, dense(10), as `bnlab.models.CNN`.

    Training or evaluation is the normalization layers' mode: `model.train()`, `model.eval()`
    or `nnx.view(model, use_running_average=...)`, as for any NNX model. A normalization with
    randomness (`bnlab.nnx.NoisyBatchNorm`) needs the step's noise in training:
    `model(x, rngs=key)` (or an `nnx.Rngs` with a `noise` stream, drawn once per call); each
    layer then draws what the linen CNN's draws when applied with `rngs={"noise": key}`.

    Args:
      norm: the normalization factory, `norm(num_features, rngs=rngs)`.
      kernel_norm: the kernel normalization of conv0, conv1 and dense, or None.
      num_classes: outputs of the head.
      act: the nonlinearity.
      placement: normalization "before" or "after" the nonlinearity.
      kernel_init: initializer of every kernel (biases start at 0).
      conv_impl: "im2col" or "xla" (see `Conv`).
      image_shape: `(H, W, C)` of the inputs, which fixes the dense layer's input size.
      rngs: the `nnx.Rngs` that initialize the variables.
    """

    def __init__(
        self,
        *,
        norm: NormFactory = bnlab_nnx.BatchNorm,
        kernel_norm: KernelNormFactory | None = None,
        num_classes: int = 10,
        act: Callable[[Array], Array] = nnx.relu,
        placement: str = "before",
        kernel_init: Callable = LECUN_NORMAL,
        conv_impl: str = "im2col",
        image_shape: tuple[int, int, int] = (28, 28, 1),
        rngs: nnx.Rngs,
    ):
        h, w, c = image_shape
        kw = dict(kernel_init=kernel_init, kernel_norm=kernel_norm, rngs=rngs)
        conv = dict(impl=conv_impl, **kw)
        self.conv0 = Conv(c, 32, **conv)
        self.block0 = NormAct(norm(32, rngs=rngs), act, placement, name="block0")
        self.conv1 = Conv(32, 64, **conv)
        self.block1 = NormAct(norm(64, rngs=rngs), act, placement, name="block1")
        flat = (h // 2 // 2) * (w // 2 // 2) * 64
        self.dense = linear(flat, 256, **kw)
        self.block2 = NormAct(norm(256, rngs=rngs), act, placement, name="block2")
        self.head = nnx.Linear(256, num_classes, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x_BxHxWxC: Array, *, rngs: bnlab_nnx.RngsLike = None) -> Array:
        """The logits of `x_BxHxWxC`; `rngs`: the step's noise (`bnlab.nnx.NoisyBatchNorm`)."""
        key = bnlab_nnx.noise_key(rngs)
        x = models.avg_pool2(self.block0(self.conv0(x_BxHxWxC), key=key))
        x = models.avg_pool2(self.block1(self.conv1(x), key=key))
        x = self.block2(self.dense(x.reshape((x.shape[0], -1))), key=key)
        return self.head(x)


MODELS: dict[str, type[nnx.Module]] = {"mlp": MLP, "cnn": CNN}


def build_model(cfg: Any, *, rngs: nnx.Rngs, axis: dict[str, Any] | None = None) -> nnx.Module:
    """The NNX model that `cfg.model`/`cfg.norm` describe: the linen model of
    `bnlab.training.train.build_model` in NNX, with the same module paths
    (`bnlab.nnx.from_linen` moves its variables in).

    Args:
      cfg: a validated `bnlab.config.Config`.
      rngs: the `nnx.Rngs` that initialize the variables.
      axis: `axis_name`/`axis_index_groups` for the statistics of a multi-device run.

    Returns:
      The model, in training mode.

    Raises:
      bnlab.schema.ConfigError: with dropout (the NNX models have none), or for a
        normalization without an NNX layer (or kernel module).
    """
    m = cfg.model
    if m.dropout:
        raise ConfigError(
            f"model.dropout={m.dropout}: the NNX models have no dropout; set model.dropout=0 "
            "or train the linen model (bnlab.training.train.build_model)."
        )
    kwargs = {"conv_impl": m.conv_impl} if m.name == "cnn" else {}
    kwargs |= {"hidden": model_config.norm_widths(m)} if m.name == "mlp" else {}
    return MODELS[m.name](
        norm=bnlab_nnx.norm_factory(cfg, axis=axis),
        kernel_norm=bnlab_nnx.kernel_norm_factory(cfg),
        num_classes=data_lib.num_classes(cfg.data.task),
        act=models.ACTIVATIONS[m.activation],
        placement=m.placement,
        kernel_init=models.INITS[m.init](m.init_std),
        rngs=rngs,
        **kwargs,
    )

"""The reference CNN in Flax NNX, with the module paths of `bnlab.models.CNN`.

Its state maps one-to-one onto the linen CNN's variables (`bnlab.nnx.to_linen`/`from_linen`):
`conv0/kernel` (HWIO), `conv0/bias`, `block0/norm/scale`, ..., `dense/kernel`, `head/bias`, and
`batch_stats/block0/norm/mean`, ... As in linen, the normalization is injected.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from bnlab import models
from bnlab import nnx as bnlab_nnx
from bnlab.types import Array

# `norm(num_features, rngs=...)` -> a layer called as `layer(x)`, e.g. `bnlab.nnx.BatchNorm` or
# `functools.partial(bnlab.nnx.BatchNorm, momentum=0.9)`.
NormFactory = Callable[..., Callable[[Array], Array]]
LECUN_NORMAL = nnx.initializers.lecun_normal()  # the default kernel init, as in linen


class Conv(nnx.Module):
    """Stride-1 SAME convolution with the variables of `bnlab.models.Conv`: `kernel` HWIO, `bias`.

    `impl` as there: "im2col" (one matmul; fast on CPU, also inside `lax.scan`) or "xla".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: tuple[int, int] = (3, 3),
        kernel_init: Callable = LECUN_NORMAL,
        impl: str = "im2col",
        rngs: nnx.Rngs,
    ):
        if impl not in models.CONV_IMPLS:
            raise ValueError(f"Conv: unknown impl {impl!r}; use one of {models.CONV_IMPLS}.")
        shape = (*kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.impl = impl

    def __call__(self, x_BxHxWxC: Array) -> Array:
        return models.conv_same(x_BxHxWxC, self.kernel[...], self.impl) + self.bias[...]


class NormAct(nnx.Module):
    """Normalization and nonlinearity in the order that `placement` names (linen's `_NormAct`)."""

    def __init__(self, norm: Callable[[Array], Array], act: Callable, placement: str = "before"):
        if placement not in models.PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; known: {models.PLACEMENTS}")
        self.norm = norm
        self.act = act
        self.placement = placement

    def __call__(self, x: Array) -> Array:
        if self.placement == "before":
            return self.act(self.norm(x))
        return self.norm(self.act(x))


class CNN(nnx.Module):
    """Reference CNN: conv3x3(32)-N-relu-avgpool2, conv3x3(64)-N-relu-avgpool2,
    dense(256)-N-relu, dense(10), as `bnlab.models.CNN`.

    Training or evaluation is the normalization layers' mode: `model.train()`, `model.eval()`
    or `nnx.view(model, use_running_average=...)`, as for any NNX model.

    Args:
      norm: the normalization factory, `norm(num_features, rngs=rngs)`.
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
        num_classes: int = 10,
        act: Callable[[Array], Array] = nnx.relu,
        placement: str = "before",
        kernel_init: Callable = LECUN_NORMAL,
        conv_impl: str = "im2col",
        image_shape: tuple[int, int, int] = (28, 28, 1),
        rngs: nnx.Rngs,
    ):
        h, w, c = image_shape
        conv = dict(kernel_init=kernel_init, impl=conv_impl, rngs=rngs)
        self.conv0 = Conv(c, 32, **conv)
        self.block0 = NormAct(norm(32, rngs=rngs), act, placement)
        self.conv1 = Conv(32, 64, **conv)
        self.block1 = NormAct(norm(64, rngs=rngs), act, placement)
        flat = (h // 2 // 2) * (w // 2 // 2) * 64
        self.dense = nnx.Linear(flat, 256, kernel_init=kernel_init, rngs=rngs)
        self.block2 = NormAct(norm(256, rngs=rngs), act, placement)
        self.head = nnx.Linear(256, num_classes, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x_BxHxWxC: Array) -> Array:
        x = models.avg_pool2(self.block0(self.conv0(x_BxHxWxC)))
        x = models.avg_pool2(self.block1(self.conv1(x)))
        x = self.block2(self.dense(x.reshape((x.shape[0], -1))))
        return self.head(x)

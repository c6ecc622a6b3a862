"""Models with an injected normalization layer, so an ablation swaps it without touching them.

A normalization may also act on the kernel of each layer that feeds a normalization site
(`kernel_norm`, a registered normalization's `NormSpec.kernel`): `dense` and `Conv` then declare
it as their submodule `norm` and use the kernel it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.nn.layers import BatchNorm, Identity
from bnlab.nn.model_config import (  # noqa: F401 - the model group, re-exported
    CONV_IMPLS,
    MLP_HIDDEN,
    NORM_MODULE,
    NORM_WIDTHS,
    PLACEMENTS,
    ModelConfig,
)
from bnlab.types import Array

ModuleDef = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "linear": lambda x: x,  # deep linear networks (Yang et al. 2019 study them too)
}
PROBE = "act_input"  # name under which each block sows the input of its nonlinearity
INITS: dict[str, Callable[[float], Callable]] = {  # name -> (std -> initializer)
    "lecun_normal": lambda std: nn.initializers.lecun_normal(),  # std unused: fan-in scaled
    "he_normal": lambda std: nn.initializers.he_normal(),  # std unused: fan-in scaled
    "normal": nn.initializers.normal,  # "small random Gaussian values" of Ioffe & Szegedy
}


class _NormAct(nn.Module):
    """Normalization and nonlinearity in the order that `placement` names."""

    norm: ModuleDef
    act: Callable[[Array], Array]
    placement: str = "before"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; known: {PLACEMENTS}")
        layer = self.norm(name=NORM_MODULE)
        if self.placement == "before":
            x = layer(x, use_running_average=not train)
        # The nonlinearity's input, kept only when "intermediates" is mutable (a probe).
        self.sow("intermediates", PROBE, x)
        x = self.act(x)
        return x if self.placement == "before" else layer(x, use_running_average=not train)


def _dropout(x: Array, rate: float, train: bool) -> Array:
    """Dropout (Srivastava et al. 2014) in training; its mask comes from the `dropout` rng
    stream, which the training step derives from the run's key and the step."""
    return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x


class Dense(nn.Module):
    """`flax.linen.Dense`'s variables (`kernel` [I, O], `bias`) and product, with the kernel
    reparameterized by `kernel_norm(name="norm")(kernel)` (e.g. `bnlab.layers.WeightNorm`)."""

    features: int
    kernel_norm: ModuleDef
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel = self.kernel_norm(name=NORM_MODULE)(kernel)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


def dense(
    features: int, *, kernel_init: Callable, kernel_norm: ModuleDef | None, name: str
) -> nn.Module:
    """The dense layer that feeds a normalization site: flax's `Dense` (the variables of every
    output normalization), or `Dense` when a kernel normalization reparameterizes its kernel."""
    if kernel_norm is None:
        return nn.Dense(features, kernel_init=kernel_init, name=name)
    return Dense(features, kernel_norm, kernel_init=kernel_init, name=name)


class MLP(nn.Module):
    """Ioffe & Szegedy (2015) Fig. 1 network: 784-100-100-100-10, sigmoid by default."""

    norm: ModuleDef = Identity
    kernel_norm: ModuleDef | None = None  # of each hidden layer's kernel (NormSpec.kernel)
    hidden: Sequence[int] = MLP_HIDDEN
    num_classes: int = 10
    act: Callable[[Array], Array] = nn.sigmoid
    placement: str = "before"
    kernel_init: Callable = nn.initializers.lecun_normal()
    dropout: float = 0.0  # after each hidden block

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            kw = {"kernel_init": self.kernel_init, "kernel_norm": self.kernel_norm}
            x = dense(width, **kw, name=f"dense{i}")(x)
            x = _NormAct(self.norm, self.act, self.placement, name=f"block{i}")(x, train)
            x = _dropout(x, self.dropout, train)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="head")(x)


class Conv(nn.Module):
    """Stride-1 SAME convolution with the variables of `flax.linen.Conv` (`kernel` HWIO, `bias`).

    `impl="im2col"` gathers the kh*kw shifted copies of the input and does one matmul. On CPU,
    XLA's convolution gradient w.r.t. the kernel is slow, and over 10x slower inside a loop
    (`lax.scan`), while matmuls stay fast; `impl="xla"` uses `lax.conv_general_dilated`.
    A `kernel_norm` reparameterizes the kernel as in `Dense`.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    kernel_init: Callable = nn.initializers.lecun_normal()
    impl: str = "im2col"
    kernel_norm: ModuleDef | None = None

    @nn.compact
    def __call__(self, x_BxHxWxC: Array) -> Array:
        kh, kw = self.kernel_size
        cin = x_BxHxWxC.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.kernel_norm is not None:
            kernel = self.kernel_norm(name=NORM_MODULE)(kernel)
        return conv_same(x_BxHxWxC, kernel, self.impl) + bias


def conv_same(x_BxHxWxC: Array, kernel_HWIO: Array, impl: str = "im2col") -> Array:
    """Stride-1 SAME convolution without bias, as `Conv` computes it (also in `nnx_models`)."""
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x_BxHxWxC, kernel_HWIO, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return _im2col_conv(x_BxHxWxC, kernel_HWIO)


def _im2col_conv(x_BxHxWxC: Array, kernel: Array) -> Array:
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x_BxHxWxC.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2  # SAME padding, as lax.conv
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return (patches.reshape(b * h * w, kh * kw * cin) @ kernel.reshape(-1, cout)).reshape(
        b, h, w, cout
    )


class CNN(nn.Module):
    """Reference CNN: conv3x3(32)-N-relu-avgpool2, conv3x3(64)-N-relu-avgpool2,
    dense(256)-N-relu, dense(10)."""

    norm: ModuleDef = BatchNorm
    kernel_norm: ModuleDef | None = None  # of conv0, conv1 and dense's kernels (NormSpec.kernel)
    num_classes: int = 10
    act: Callable[[Array], Array] = nn.relu
    placement: str = "before"
    kernel_init: Callable = nn.initializers.lecun_normal()
    conv_impl: str = "im2col"
    dropout: float = 0.0  # after the dense block (and the conv blocks with dropout_conv)
    dropout_conv: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i, features in enumerate((32, 64)):
            kw = {"kernel_init": self.kernel_init, "kernel_norm": self.kernel_norm}
            x = Conv(features, impl=self.conv_impl, **kw, name=f"conv{i}")(x)
            x = _NormAct(self.norm, self.act, self.placement, name=f"block{i}")(x, train)
            x = avg_pool2(x)
            x = _dropout(x, self.dropout if self.dropout_conv else 0.0, train)
        x = x.reshape((x.shape[0], -1))
        kw = {"kernel_init": self.kernel_init, "kernel_norm": self.kernel_norm}
        x = dense(256, **kw, name="dense")(x)
        x = _NormAct(self.norm, self.act, self.placement, name="block2")(x, train)
        x = _dropout(x, self.dropout, train)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="head")(x)


def avg_pool2(x_BxHxWxC: Array) -> Array:
    """2x2 average pooling with stride 2 (odd trailing rows/columns dropped, as VALID pooling).

    `flax.linen.avg_pool`, a window sum: on CPU the mean over the axes of a (B, H/2, 2, W/2, 2,
    C) view (bnlab's pooling before fe86728) compiled to a slow reduction at large batches
    (evaluation in batches of 1000: 1.3x slower; BENCHMARKS.md, "The evaluation"); at 100, and
    in training, the two take the same time.
    """
    return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(2, 2), padding="VALID")


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN}

"""Prototype for the BN-op target (fwd+bwd <= 1.0x flax.linen.BatchNorm in float32): bnlab's
training-mode BN with other ways to compute the batch moments, timed against bnlab as it is
and flax, in the setting of benchmarks/bn_op.py (jit of value_and_grad w.r.t. x, scale and
bias, running statistics returned, x (128,14,14,64)).

bnlab today takes both sums of `d = x - shift` in one pass; XLA:CPU writes `d` out as a
float32 temporary because it feeds two reductions. The prototypes keep the shift (a sample
of the data, so the variance has no cancellation and is exactly 0 for a constant feature):

  4d one pass   today's formula (isolates the backward's change, below)
  2d one pass   today's formula over the free (N*H*W, C) view of x
  2d two pass   mean = shift + mean(x - shift), var = mean((x - mean)^2): each reduction has
                its own fused producer (no temporary), x is read twice
  4d two pass   the same over the 4-D x

Each uses bnlab's closed-form backward (Ioffe & Szegedy 2015, Sec. 3), its reductions over the
same view as its forward, without the terms of the batch statistics' cotangents, which are
zero in training (bnlab computes them always: `2 * dvar * x_hat / rstd` is one more
elementwise pass; a `custom_vjp` with `symbolic_zeros=True` can skip them). One device, no
mask (the prototype of the single-device path). Also measured and dropped: today's formula as
one `lax.reduce` with two operands (a variadic reduction): 2.6x flax's forward, and its
sequential sums drift from the others by 1e-3.

Command: python benchmarks/bn_moments.py [--reps 300] [--shape 128,14,14,64]
"""

from __future__ import annotations

import argparse
import functools

import bn_op
import env_info
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bnlab

EPSILON = bn_op.EPSILON


def _moments_one_pass(v, axes):
    shift = lax.stop_gradient(v[tuple(slice(0, 1) if a in axes else slice(None)
                                      for a in range(v.ndim))])  # fmt: skip
    d = v - shift
    m1, m2 = jnp.mean(d, axes, keepdims=True), jnp.mean(jnp.square(d), axes, keepdims=True)
    return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _moments_two_pass(v, axes):
    shift = lax.stop_gradient(v[tuple(slice(0, 1) if a in axes else slice(None)
                                      for a in range(v.ndim))])  # fmt: skip
    mean = shift + jnp.mean(v - shift, axes, keepdims=True)
    return mean, jnp.mean(jnp.square(v - mean), axes, keepdims=True)


def prototype(moments, flat: bool):
    """A training-mode BN `(x, scale, bias, stats) -> (y, new_stats)` with `moments`."""

    def view(x):
        return (x.reshape(-1, x.shape[-1]), (0,)) if flat else (x, tuple(range(x.ndim - 1)))

    @functools.partial(jax.custom_vjp)
    def normalize(x, scale, bias):
        return fwd(x, scale, bias)[0]

    def fwd(x, scale, bias):
        v, axes = view(x)
        mean, var = moments(v, axes)
        rstd = lax.rsqrt(var + EPSILON)
        y = (v - mean) * (rstd * scale) + bias
        return (y.reshape(x.shape), mean.reshape(-1), var.reshape(-1)), (x, mean, rstd, scale)

    def bwd(res, cotangents):
        x, mean, rstd, scale = res
        dy, _, _ = cotangents  # the statistics' cotangents are zero in this benchmark
        v, axes = view(x)
        g, _ = view(dy)
        x_hat = (v - mean) * rstd
        n = v.size // v.shape[-1]
        sum_dy = jnp.sum(g, axes, keepdims=True)
        sum_dy_xhat = jnp.sum(g * x_hat, axes, keepdims=True)
        dx = (rstd * scale) * (g - (sum_dy + x_hat * sum_dy_xhat) / n)
        return dx.reshape(x.shape), sum_dy_xhat.reshape(-1), sum_dy.reshape(-1)

    normalize.defvjp(fwd, bwd)

    def forward(x, scale, bias, stats):
        y, mean, var = normalize(x, scale, bias)
        m = bn_op.MOMENTUM
        return y, {
            "mean": bnlab.moving_average(stats["mean"], mean, m),
            "var": bnlab.moving_average(stats["var"], var, m),
        }

    return forward


VARIANTS = {
    "4d one pass": prototype(_moments_one_pass, flat=False),
    "2d one pass": prototype(_moments_one_pass, flat=True),
    "2d two pass": prototype(_moments_two_pass, flat=True),
    "4d two pass": prototype(_moments_two_pass, flat=False),
}


def check(shape) -> None:
    """Each prototype equals bnlab (outputs, statistics, gradients) and keeps a constant
    feature's variance exactly 0."""
    x = jax.random.normal(jax.random.key(1), shape) * 0.5 + 3.0
    x = x.at[..., 0].set(0.1)  # a constant feature
    scale, bias = jnp.full(shape[-1:], 1.1), jnp.full(shape[-1:], 0.2)
    ct = jax.random.normal(jax.random.key(2), shape)
    stats = bnlab.init_stats(shape[-1])
    want = jax.jit(bn_op.jit_pair(bn_op.bnlab_forward("analytic"))[1])(x, scale, bias, stats, ct)
    for name, forward in VARIANTS.items():
        got = bn_op.jit_pair(forward)[1](x, scale, bias, stats, ct)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
        (_, new_stats), _ = got
        var0 = float((new_stats["var"][0] - bn_op.MOMENTUM) / (1 - bn_op.MOMENTUM))
        print(f"  {name}: equal to bnlab; constant feature's batch variance {var0:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,14,14,64", help="x shape, features last")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per variant")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved blocks of calls")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    print(env_info.header())
    other_load = env_info.OtherLoad()
    check(shape)
    kx, kc, ks, kb = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, shape, jnp.float32)
    ct = jax.random.normal(kc, shape, jnp.float32)
    scale = 1.0 + 0.1 * jax.random.normal(ks, shape[-1:], jnp.float32)
    bias = 0.1 * jax.random.normal(kb, shape[-1:], jnp.float32)
    pairs = {
        "bnlab analytic": bn_op.jit_pair(bn_op.bnlab_forward("analytic")),
        **{name: bn_op.jit_pair(f) for name, f in VARIANTS.items()},
        bn_op.FLAX: bn_op.jit_pair(bn_op.flax_forward(jnp.float32)),
    }
    fns = {(name, kind): f for name, pair in pairs.items() for kind, f in zip(("fwd", "fwd+bwd"), pair, strict=True)}  # fmt: skip  # noqa: E501
    ms = bn_op.time_calls(fns, (x, scale, bias, bnlab.init_stats(shape[-1]), ct), args.reps,
                          args.rounds)  # fmt: skip
    bn_op.print_table(
        f"float32 x {shape}, median of {args.reps} calls",
        {name: (ms[name, "fwd"], ms[name, "fwd+bwd"]) for name in pairs},
    )
    print(other_load.report())


if __name__ == "__main__":
    main()

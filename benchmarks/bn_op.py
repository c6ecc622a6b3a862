"""Time of one training-mode BN call, forward and forward+backward: bnlab vs flax.

The forward+backward of each variant is `jit(value_and_grad(loss, argnums=(x, scale, bias)))`
with `loss = sum(y * ct)` for a fixed random cotangent `ct`; the updated running statistics
are returned too, so every variant does the same work: batch moments, normalization, the
moving-average update, and the gradients w.r.t. x, scale and bias. The forward column times
`jit` of the forward alone (`y` and the new statistics).

Variants: bnlab with its closed-form backward (`backward="analytic"`, the default) and with
`backward="autodiff"`; `flax.linen.BatchNorm` as configured by default (the reference; its
variance is one-pass, E[x^2] - E[x]^2) and with `use_fast_variance=False` (two-pass,
E[(x - E[x])^2], the formula bnlab uses).

Command: python benchmarks/bn_op.py [--reps 300] [--shape 128,14,14,64] [--no-bf16]
Runtime: about 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import env_info
import flax.linen as nn
import jax
import jax.numpy as jnp

import bnlab

MOMENTUM = 0.99
EPSILON = 1e-5
FLAX = "flax.linen.BatchNorm"  # the reference: default settings (one-pass variance)


def bnlab_forward(backward: str):
    def forward(x, scale, bias, stats):
        y, new_stats = bnlab.batch_norm(
            x,
            stats,
            scale,
            bias,
            training=True,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            backward=backward,
        )
        return y, new_stats

    return forward


def flax_forward(dtype, fast_variance: bool = True):
    # dtype pins the output dtype to the input's, as bnlab does (flax would promote to f32).
    layer = nn.BatchNorm(
        use_running_average=False,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        dtype=dtype,
        use_fast_variance=fast_variance,
    )

    def forward(x, scale, bias, stats):
        y, updates = layer.apply(
            {"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
            x,
            mutable=["batch_stats"],
        )
        return y, updates["batch_stats"]

    return forward


def jit_pair(forward):
    """`(forward only, value_and_grad w.r.t. x, scale, bias)`, both jitted, same arguments."""

    def loss(x, scale, bias, stats, ct):
        y, new_stats = forward(x, scale, bias, stats)
        return jnp.sum(y.astype(jnp.float32) * ct), new_stats

    fwd = jax.jit(lambda x, scale, bias, stats, ct: forward(x, scale, bias, stats))
    return fwd, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def time_calls(fns: dict, args, reps: int, rounds: int) -> dict[str, float]:
    """Median ms per call; variants alternate in `rounds` blocks so drift hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))
    samples = {name: [] for name in fns}
    per_round = max(reps // rounds, 1)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def bench(shape: tuple[int, ...], dtype, reps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """`{variant: (forward ms, forward+backward ms)}`."""
    kx, kc, ks, kb = jax.random.split(jax.random.key(0), 4)
    features = shape[-1]
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, shape, jnp.float32)
    scale = 1.0 + 0.1 * jax.random.normal(ks, (features,), jnp.float32)
    bias = 0.1 * jax.random.normal(kb, (features,), jnp.float32)
    stats = bnlab.init_stats(features)
    pairs = {
        "bnlab analytic": jit_pair(bnlab_forward("analytic")),
        "bnlab autodiff": jit_pair(bnlab_forward("autodiff")),
        FLAX: jit_pair(flax_forward(dtype)),
        "flax two-pass variance": jit_pair(flax_forward(dtype, fast_variance=False)),
    }
    fns = {}
    for name, (fwd, fwd_bwd) in pairs.items():
        fns[(name, "fwd")] = fwd
        fns[(name, "fwd+bwd")] = fwd_bwd
    ms = time_calls(fns, (x, scale, bias, stats, ct), reps, rounds)
    return {name: (ms[(name, "fwd")], ms[(name, "fwd+bwd")]) for name in pairs}


def print_table(title: str, ms: dict[str, tuple[float, float]]) -> None:
    flax_fwd, flax_both = ms[FLAX]
    print(f"\n{title}")
    print(f"{'variant':<24}{'fwd ms':>9}{'vs flax':>9}{'fwd+bwd ms':>12}{'vs flax':>9}")
    for name, (fwd, both) in ms.items():
        print(f"{name:<24}{fwd:>9.3f}{fwd / flax_fwd:>8.2f}x{both:>12.3f}{both / flax_both:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,14,14,64", help="x shape, features last")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per variant")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved blocks of calls")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 table")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    print(env_info.header())
    other_load = env_info.OtherLoad()
    print(f"x {shape}; median of {args.reps} calls per cell")
    f32 = bench(shape, jnp.float32, args.reps, args.rounds)
    print_table("float32 input", f32)
    if not args.no_bf16:
        bf16 = bench(shape, jnp.bfloat16, args.reps, args.rounds)
        print_table("bfloat16 input (statistics in float32)", bf16)
    ratio = f32["bnlab analytic"][1] / f32[FLAX][1]
    verdict = "MET" if ratio <= 1.0 else "NOT MET"
    print(other_load.report())
    print(f"\ntarget bnlab analytic fwd+bwd <= 1.0x flax (float32): {ratio:.2f}x -> {verdict}")


if __name__ == "__main__":
    main()

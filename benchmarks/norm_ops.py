"""Time of every normalization variant's training-mode forward+backward, as ratios in one run.

Each implementation is timed as `jit(value_and_grad(loss, argnums=(x, scale, bias)))` with
`loss = sum(y * ct)` for a fixed random cotangent `ct`, the new running statistics returned
too (`bn_op.jit_pair`), all implementations interleaved in blocks (`bn_op.time_calls`).
References: `flax.linen.LayerNorm` and `flax.linen.GroupNorm` (both `use_fast_variance=False`,
the two-pass variance) for bnlab's `layer_norm` and `group_norm`; bnlab's `batch_norm` for the
BN variants. Targets on the 2-core CPU: LayerNorm and GroupNorm at most 1.1x flax's time,
ghost BN and batch renorm at most 1.3x `batch_norm`'s.

With `--ghost-virtual 128,64,32,8` it times instead `batch_norm` and ghost BN at each of those
virtual batch sizes, forward alone and forward+backward: where ghost BN's extra time goes.

Command: python benchmarks/norm_ops.py [--reps 300] [--shape 128,14,14,64] [--groups 32]
         [--ghost-virtual 128,64,32,8]
Runtime: about 40 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools

import bn_op
import env_info
import flax.linen as nn
import jax
import jax.numpy as jnp

import bnlab
from bnlab import norm

BN = "batch_norm"
TARGETS = {  # variant -> (reference, largest ratio)
    "layer_norm": ("flax LayerNorm", 1.1),
    "group_norm": ("flax GroupNorm", 1.1),
    "ghost_batch_norm": (BN, 1.3),
    "batch_renorm": (BN, 1.3),
}


def bn_variant(fn, **kwargs):
    """A bnlab BN variant as `forward(x, scale, bias, stats) -> (y, new_stats)`."""

    def forward(x, scale, bias, stats):
        return fn(x, stats, scale, bias, training=True, momentum=bn_op.MOMENTUM, **kwargs)

    return forward


def stateless(fn):
    """`fn(x, scale, bias) -> y` as a forward with statistics passed through."""
    return lambda x, scale, bias, stats: (fn(x, scale, bias), stats)


def flax_norm(module: nn.Module):
    return stateless(
        lambda x, scale, bias: module.apply({"params": {"scale": scale, "bias": bias}}, x)
    )


def implementations(shape: tuple[int, ...], groups: int) -> dict[str, tuple[str | None, object]]:
    """name -> (the reference it is compared with, forward)."""
    reduction = tuple(range(1, len(shape)))
    eps = bn_op.EPSILON
    return {
        BN: (None, bn_variant(bnlab.batch_norm)),
        "ghost_batch_norm": (BN, bn_variant(bnlab.ghost_batch_norm, virtual_batch_size=32)),
        "batch_renorm": (BN, bn_variant(bnlab.batch_renorm, r_max=3.0, d_max=5.0)),
        "noisy_batch_norm": (
            BN,
            bn_variant(
                bnlab.noisy_batch_norm, key=jax.random.key(0), noise_mean=0.5, noise_std=1.0
            ),
        ),
        "population_batch_norm": (BN, bn_variant(bnlab.population_batch_norm)),
        "batch_norm, no affine": (
            BN,
            lambda x, scale, bias, stats: bnlab.batch_norm(
                x, stats, training=True, momentum=bn_op.MOMENTUM
            ),
        ),
        "flax LayerNorm": (
            None,
            flax_norm(nn.LayerNorm(epsilon=eps, reduction_axes=reduction, use_fast_variance=False)),
        ),
        "layer_norm": (
            "flax LayerNorm",
            stateless(functools.partial(norm.layer_norm, epsilon=eps)),
        ),
        "flax GroupNorm": (
            None,
            flax_norm(nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False)),
        ),
        "group_norm": (
            "flax GroupNorm",
            stateless(functools.partial(norm.group_norm, num_groups=groups, epsilon=eps)),
        ),
    }


def _args(shape):
    """`(x, scale, bias, stats, ct)` for `bn_op.jit_pair`'s functions."""
    kx, kc, ks, kb = jax.random.split(jax.random.key(0), 4)
    features = shape[-1]
    x = jax.random.normal(kx, shape, jnp.float32)
    ct = jax.random.normal(kc, shape, jnp.float32)
    scale = 1.0 + 0.1 * jax.random.normal(ks, (features,), jnp.float32)
    bias = 0.1 * jax.random.normal(kb, (features,), jnp.float32)
    return x, scale, bias, bnlab.init_stats(features), ct


def bench(shape, groups, reps, rounds) -> dict[str, tuple[str | None, float]]:
    """`{name: (reference, fwd+bwd ms)}`, every implementation interleaved with the others."""
    impls = implementations(shape, groups)
    fns = {name: bn_op.jit_pair(forward)[1] for name, (_, forward) in impls.items()}
    ms = bn_op.time_calls(fns, _args(shape), reps, rounds)
    return {name: (ref, ms[name]) for name, (ref, _) in impls.items()}


def ghost_by_virtual_batch(shape, sizes, reps, rounds) -> None:
    """Prints `batch_norm` and ghost BN per virtual batch size: forward, forward+backward."""
    impls = {BN: bn_variant(bnlab.batch_norm)}
    for v in sizes:
        impls[f"ghost, virtual {v}"] = bn_variant(bnlab.ghost_batch_norm, virtual_batch_size=v)
    pairs = {name: bn_op.jit_pair(forward) for name, forward in impls.items()}
    args = _args(shape)
    both = bn_op.time_calls({k: p[1] for k, p in pairs.items()}, args, reps, rounds)
    fwd = bn_op.time_calls({k: p[0] for k, p in pairs.items()}, args, reps, rounds)
    print(f"\n{'implementation':<20}{'fwd ms':>9}{'ratio':>7}{'fwd+bwd ms':>12}{'ratio':>7}")
    for name in impls:
        print(f"{name:<20}{fwd[name]:>9.3f}{fwd[name] / fwd[BN]:>6.2f}x"
              f"{both[name]:>12.3f}{both[name] / both[BN]:>6.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,14,14,64", help="x shape, features last")
    parser.add_argument("--groups", type=int, default=32, help="GroupNorm's groups")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per implementation")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved blocks of calls")
    parser.add_argument("--ghost-virtual", help="e.g. 128,64,32,8: ghost BN per virtual batch")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    print(env_info.header())
    other_load = env_info.OtherLoad()
    if args.ghost_virtual:
        sizes = [int(v) for v in args.ghost_virtual.split(",")]
        print(f"x {shape}, float32; median of {args.reps} calls per cell")
        ghost_by_virtual_batch(shape, sizes, args.reps, args.rounds)
        print(other_load.report())
        return
    print(f"x {shape}, float32, {args.groups} groups; median of {args.reps} calls per cell")
    ms = bench(shape, args.groups, args.reps, args.rounds)
    print(f"\n{'implementation':<24}{'fwd+bwd ms':>11}  {'vs':<16}{'ratio':>7}")
    for name, (ref, t) in ms.items():
        ratio = f"{t / ms[ref][1]:.2f}x" if ref else ""
        print(f"{name:<24}{t:>11.3f}  {ref or '':<16}{ratio:>7}")
    print(other_load.report())
    print()
    for name, (ref, limit) in TARGETS.items():
        ratio = ms[name][1] / ms[ref][1]
        verdict = "MET" if ratio <= limit else "NOT MET"
        print(f"target {name} fwd+bwd <= {limit}x {ref}: {ratio:.2f}x -> {verdict}")


if __name__ == "__main__":
    main()

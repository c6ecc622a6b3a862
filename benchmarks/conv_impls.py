"""The reference CNN's two convolutions, forward and backward inside `lax.scan` (as bnlab's
scanned epoch runs them), by implementation:

  im2col     bnlab's `models.conv_same`: the 9 shifted copies concatenated, one matmul
  stack      the copies stacked on a new axis instead of concatenated
  dus        the copies written into a zero buffer with `dynamic_update_slice`
  tapmajor   the copies stacked tap-major, (9, B*H*W, C_in), contracted with an einsum
  chunkedK   im2col over K batch chunks (`lax.map`/`lax.scan` in a `custom_vjp`)
  xla        `lax.conv_general_dilated` (bnlab's `model.conv_impl="xla"`)
  hybrid     XLA's convolution forward and input gradient, the kernel gradient as im2col's
             patch matmul (`custom_vjp`)

Each program runs 20 steps of `vjp` and an update of input and kernel, median of 5 calls,
implementations in turn; the relative error is the largest of output and both gradients
against im2col. Pass XLA flags in the environment (`XLA_FLAGS=...`) to time them.

Command: python benchmarks/conv_impls.py [--impls im2col,xla,...] [--batch 128]
Runtime: about 2 minutes on a 2-core CPU (xla: over a second a step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import env_info
import jax
import jax.numpy as jnp
import numpy as np

from bnlab.models import conv_same

DN = ("NHWC", "HWIO", "NHWC")
STEPS = 20


def _padded(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _shifted(x):
    b, h, w, _ = x.shape
    p = _padded(x)
    return [p[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def im2col_stack(x, k):
    b, h, w, cin = x.shape
    patches = jnp.stack(_shifted(x), axis=3).reshape(b * h * w, 9 * cin)
    return (patches @ k.reshape(9 * cin, -1)).reshape(b, h, w, -1)


def im2col_dus(x, k):
    b, h, w, cin = x.shape
    buf = jnp.zeros((b, h, w, 9 * cin), x.dtype)
    for t, piece in enumerate(_shifted(x)):
        buf = jax.lax.dynamic_update_slice(buf, piece, (0, 0, 0, t * cin))
    return (buf.reshape(b * h * w, 9 * cin) @ k.reshape(9 * cin, -1)).reshape(b, h, w, -1)


def im2col_tapmajor(x, k):
    b, h, w, cin = x.shape
    taps = jnp.stack([s.reshape(b * h * w, cin) for s in _shifted(x)], axis=0)
    return jnp.einsum("tmc,tco->mo", taps, k.reshape(9, cin, -1)).reshape(b, h, w, -1)


def xla_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)


def _patches(x):
    b, h, w, cin = x.shape
    return jnp.concatenate(_shifted(x), axis=-1).reshape(b * h * w, 9 * cin)


@jax.custom_vjp
def hybrid(x, k):
    return xla_conv(x, k)


def _hybrid_fwd(x, k):
    return xla_conv(x, k), (x, k)


def _hybrid_bwd(res, g):
    x, k = res
    dx = jax.lax.conv_general_dilated(
        g, jnp.flip(k, (0, 1)).swapaxes(2, 3), (1, 1), "SAME", dimension_numbers=DN
    )
    dk = (_patches(x).T @ g.reshape(-1, k.shape[-1])).reshape(k.shape)
    return dx, dk


hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def chunked(num_chunks: int):
    @jax.custom_vjp
    def conv(x, k):
        return _fwd(x, k)[0]

    def _fwd(x, k):
        b, h, w, cin = x.shape
        xs = x.reshape(num_chunks, b // num_chunks, h, w, cin)
        y = jax.lax.map(lambda xi: conv_same(xi, k), xs)
        return y.reshape(b, h, w, -1), (x, k)

    def _bwd(res, g):
        x, k = res
        b, h, w, cin = x.shape
        xs = x.reshape(num_chunks, b // num_chunks, h, w, cin)
        gs = g.reshape(num_chunks, b // num_chunks, h, w, -1)

        def body(dk, chunk):
            xi, gi = chunk
            dxi, dki = jax.vjp(conv_same, xi, k)[1](gi)
            return dk + dki, dxi

        dk, dx = jax.lax.scan(body, jnp.zeros_like(k), (xs, gs))
        return dx.reshape(x.shape), dk

    conv.defvjp(_fwd, _bwd)
    return conv


IMPLS = {
    "im2col": conv_same,
    "stack": im2col_stack,
    "dus": im2col_dus,
    "tapmajor": im2col_tapmajor,
    **{f"chunked{c}": chunked(c) for c in (2, 4, 8, 16)},
    "xla": xla_conv,
    "hybrid": hybrid,
}


def scanned(conv, ct):
    def run(x, k):
        def body(carry, _):
            x, k = carry
            y, vjp = jax.vjp(conv, x, k)
            dx, dk = vjp(ct * jnp.mean(y))
            return (x - 1e-6 * dx, k - 1e-6 * dk), None

        return jax.lax.scan(body, (x, k), None, length=STEPS)[0]

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    names = args.impls.split(",")
    if unknown := sorted(set(names) - set(IMPLS)):
        parser.error(f"unknown implementations {unknown}; choose from {list(IMPLS)}")
    print(env_info.header())
    other_load = env_info.OtherLoad()
    rng = np.random.default_rng(0)
    for name, (size, cin, cout) in {"conv1": (14, 32, 64), "conv0": (28, 1, 32)}.items():
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, cin)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
        ct = jnp.asarray(rng.standard_normal((args.batch, size, size, cout)), jnp.float32)
        ref_y, ref_vjp = jax.vjp(conv_same, x, k)
        refs = (ref_y, *ref_vjp(ct))
        programs, errors = {}, {}
        for impl in names:
            y, vjp = jax.vjp(IMPLS[impl], x, k)
            errors[impl] = max(
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip((y, *vjp(ct)), refs, strict=True)
            )
            programs[impl] = scanned(IMPLS[impl], ct)
            jax.block_until_ready(programs[impl](x, k))
        times = {impl: [] for impl in names}
        for _ in range(args.reps):
            for impl, program in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(program(x, k))
                times[impl].append((time.perf_counter() - start) / STEPS)
        base = statistics.median(times[names[0]])
        print(f"\n{name}: x ({args.batch},{size},{size},{cin}), {cout} features; fwd+bwd per "
              f"step in a {STEPS}-step scan, median of {args.reps}")  # fmt: skip
        for impl, ts in times.items():
            median = statistics.median(ts)
            print(
                f"  {impl:10s} {median * 1e3:8.2f} ms [{min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f}]"
                f"  {median / base:6.2f}x {names[0]}'s time   rel. error {errors[impl]:.1e}"
            )
    print(other_load.report())


if __name__ == "__main__":
    main()

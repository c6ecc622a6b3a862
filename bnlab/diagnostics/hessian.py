"""`hessian`: top eigenvalues and spectral density of the loss's Hessian (Ghorbani et al. 2019).

Matrix-free: the Hessian is only ever applied to vectors. The Lanczos tridiagonalization
(with full reorthogonalization) is `matfree.decomp.tridiag_sym`: a maintained JAX library that
is jittable and vmappable, so neither the Lanczos recurrence nor its reorthogonalization is
written here. Stochastic Lanczos quadrature is the eigendecomposition of that tridiagonal
matrix (Golub & Meurant 2010; Ubaru et al. 2017).

Hessian-vector products are reverse-over-reverse: the VJP of the gradient, linearized once
(the Hessian is symmetric). BN's analytic backward (`norm.backward="analytic"`) is a
`jax.custom_vjp`, which has no JVP rule: forward mode through the loss (`jax.jvp` of it)
raises. Reverse-over-reverse differentiates the custom backward as an ordinary function, so it
serves both `norm.backward` values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from matfree import decomp

from bnlab.diagnostics.common import batch_loss, eigh
from bnlab.diagnostics.weight_norms import in_units
from bnlab.schema import ConfigError
from bnlab.types import Array, Params

Matvec = Callable[[Array], Array]  # f32[n] -> f32[n]


def hessian_matvec(loss_fn: Callable[[Params], Array], params: Params) -> tuple[Array, Matvec]:
    """`(w f32[n], v -> H v)` for the Hessian `H` of `loss_fn` at `params`, flattened.

    The gradient is linearized once; each product is then one backward pass through it.
    """
    flat, unravel = ravel_pytree(params)

    def grad_flat(w):
        return ravel_pytree(jax.grad(loss_fn)(unravel(w)))[0]

    _, vjp = jax.vjp(grad_flat, flat)
    return flat, lambda v: vjp(v)[0]  # v^T H = (H v)^T: H is symmetric


def lanczos_quadrature(matvec: Matvec, v: Array, *, num_iters: int) -> tuple[Array, Array]:
    """Gauss quadrature of the spectral measure of `H` seen from `v` (Golub & Meurant 2010).

    `num_iters` Lanczos steps from `v / ||v||` give `H ~ Q T Q^T`; with `T = U diag(theta) U^T`
    the nodes are the Ritz values `theta_i` and the weights `tau_i = U[0, i]^2` (summing to 1):

        sum_i tau_i f(theta_i) ~ v^T f(H) v / ||v||^2,

    exact for polynomials `f` of degree < 2 * num_iters.

    Args:
      matvec: `v -> H v` on flat vectors, `H` symmetric.
      v: `f32[n]`, nonzero.
      num_iters: Krylov dimension, `1 <= num_iters <= n`.

    Returns:
      `(nodes f32[num_iters] ascending, weights f32[num_iters])`.
    """
    tridiag = decomp.tridiag_sym(num_iters, reortho="full", custom_vjp=False)
    _, t, *_ = tridiag(lambda x: matvec(x), v)
    nodes, vectors = eigh(t)
    return nodes, vectors[0] ** 2


def hessian_eigenvalues(
    loss_fn: Callable[[Params], Array], params: Params, *, k: int, key: Array, num_iters: int
) -> Array:
    """The `k` largest eigenvalues of the Hessian of `loss_fn` at `params`, by Lanczos.

    Ritz values of the Krylov space `span{v, Hv, ..., H^(m-1) v}`, `m = num_iters`, from a
    Gaussian `v` (Lanczos 1950): the extreme eigenvalues converge first, so `m` a few times
    `k` usually pins the top ones. Hessian-vector products are reverse-over-reverse, valid
    for any normalization backward, BN's custom VJP included.

    Args:
      loss_fn: `params -> scalar`, any pytree of float arrays.
      params: where the Hessian is taken.
      k: how many, `1 <= k <= num_iters`.
      key: the start vector's key.
      num_iters: Lanczos iterations, at most the number of parameters.

    Returns:
      `f32[k]`, descending.

    Raises:
      ValueError: `k` or `num_iters` out of range.
    """
    _check_sizes(params, num_iters, k)
    flat, matvec = hessian_matvec(loss_fn, params)
    v = jax.random.normal(key, flat.shape, flat.dtype)
    nodes, _ = lanczos_quadrature(matvec, v, num_iters=num_iters)
    return nodes[::-1][:k]


def spectral_density(
    loss_fn: Callable[[Params], Array],
    params: Params,
    *,
    key: Array,
    num_probes: int,
    num_iters: int,
) -> tuple[Array, Array]:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density (Ghorbani et al. 2019;
    Ubaru et al. 2017).

    With Gaussian probes `v_l` and each probe's quadrature `(theta_i^l, tau_i^l)`
    (`lanczos_quadrature`), the density of the `n` eigenvalues `lambda_j`

        phi(t) = 1/n sum_j delta(t - lambda_j)
               ~ 1/L sum_l sum_i tau_i^l delta(t - theta_i^l)

    (`gaussian_density` smooths it for plotting).

    Returns:
      `(nodes f32[num_probes, num_iters], weights f32[num_probes, num_iters])`.

    Raises:
      ValueError: `num_iters` exceeds the number of parameters.
    """
    _check_sizes(params, num_iters)
    flat, matvec = hessian_matvec(loss_fn, params)
    return _quadratures(matvec, _probes(key, num_probes, flat), num_iters)


def _probes(key: Array, num_probes: int, flat: Array) -> Array:
    return jax.random.normal(key, (num_probes, flat.size), flat.dtype)


def _quadratures(matvec: Matvec, probes: Array, num_iters: int) -> tuple[Array, Array]:
    return jax.vmap(lambda v: lanczos_quadrature(matvec, v, num_iters=num_iters))(probes)


def gaussian_density(nodes: Array, weights: Array, grid: Array, *, sigma: float) -> Array:
    """The quadrature's density on `grid`, each node a Gaussian of width `sigma` (as Ghorbani et
    al. 2019 plot it): `phi(t) = mean_l sum_i tau_i^l N(t; theta_i^l, sigma^2)`; integrates to 1.

    Args:
      nodes, weights: `f32[L, m]` from `spectral_density` (or `f32[m]` for one probe).
      grid: `f32[T]` points.
      sigma: kernel width > 0.

    Returns:
      `f32[T]`.
    """
    nodes, weights = jnp.atleast_2d(nodes), jnp.atleast_2d(weights)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.sum(kernel * weights[None], axis=(1, 2)) / nodes.shape[0]


def _check_sizes(params: Params, num_iters: int, k: int = 1) -> None:
    n = sum(x.size for x in jax.tree.leaves(params))
    if not 1 <= k <= num_iters <= n:
        raise ValueError(
            f"need 1 <= k ({k}) <= num_iters ({num_iters}) <= number of parameters ({n})."
        )


def measure(ctx: Any) -> dict[str, Array]:
    """`lambda_max`, `top_eigenvalues f32[k]`, `density_nodes` and `density_weights`
    (`f32[probes, iters]`) of the loss's Hessian on the fixed batch, in
    `diagnostics.hessian_units` (`in_units`).

    One Lanczos run per probe, all in one vmapped program: the first probe's `k` largest Ritz
    values are the top eigenvalues, and every probe's quadrature is the density's.

    Raises:
      ConfigError: more Lanczos iterations than the model has parameters.
    """
    d = ctx.cfg.diagnostics
    loss_fn = batch_loss(ctx, train=d.hessian_statistics == "batch")
    try:
        _check_sizes(ctx.state.params, d.hessian_num_iters, d.hessian_top_k)
    except ValueError as err:
        raise ConfigError(f"diagnostics.hessian_num_iters, hessian_top_k: {err}") from err
    flat, matvec = hessian_matvec(*in_units(ctx, loss_fn, d.hessian_units))
    probes = _probes(jax.random.fold_in(ctx.rng, 2), d.hessian_num_probes, flat)
    nodes, weights = _quadratures(matvec, probes, d.hessian_num_iters)
    top = nodes[0, ::-1][: d.hessian_top_k]
    return {
        "lambda_max": top[0],
        "top_eigenvalues": top,
        "density_nodes": nodes,
        "density_weights": weights,
    }

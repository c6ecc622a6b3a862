"""`hessian_data`: the Hessian of the training loss over the data, its outliers and the bulk
(Ghorbani et al. 2019; Gur-Ari et al. 2018; Cohen et al. 2021).

The loss is the mean over the diagnostic batch cut into batches of
`diagnostics.hessian_data_batch_size`, each normalized with its own statistics as a training
step normalizes it: with `diagnostics.batch_size=10240` and 128, the mean over 80 batches,
10,240 examples. Lanczos on its Hessian (`hessian.lanczos_quadrature`, full
reorthogonalization) from `hessian_data_num_probes` Gaussian probes of
`hessian_data_num_iters` steps each gives:

- `top_eigenvalues f32[k]`: the first probe's `k` largest Ritz values; `lambda_max` the first;
- `density_nodes`, `density_weights` `f32[probes, iters]`: the stochastic Lanczos quadrature
  of the eigenvalue density, as `hessian`'s;
- `bulk_edge`: the largest node in the bulk, the median over probes (`bulk_edge`): a node
  that stands for at least `hessian_data_bulk_weight` eigenvalues (weight >= that / n, n
  parameters), or one that Lanczos has not resolved. A resolved isolated eigenvalue carries
  weight (v.u)^2/||v||^2, about 1/n, while a node inside the bulk stands for about n/iters
  of them; the light nodes at the bulk's end are not resolved;
- `outliers`: the first probe's Ritz values above the edge (Ghorbani et al.'s outliers: light,
  resolved, separated from the bulk). A count, not a spectrum: it is as fine as the Lanczos
  resolution (a tail of resolved eigenvalues above a dense bulk counts whole), and two nearly
  equal top eigenvalues can leave the upper one unresolved, which moves the edge above both;
  read it beside `top_eigenvalues` and the density;
- `gradient_fraction`: `||P_k g||^2 / ||g||^2`, the share of the gradient in the span of the
  top-k Ritz vectors (Gur-Ari et al. 2018 find it near 1 after a few steps);
- `edge_of_stability`: `lr_t * lambda_max / 2`, 1 at gradient descent's stability limit
  (Cohen et al. 2021; with momentum beta the limit is at `1 + beta`), in raw units only;
- `loss`: the mean loss itself (to compare runs at matched training loss).

In `hessian_data_units="scale_invariant"` every quantity is that of `D H D`
(`weight_norms.in_units`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from matfree import decomp

from bnlab.diagnostics.common import eigh, measurement_rngs, model_loss
from bnlab.diagnostics.hessian import _check_sizes, hessian_matvec
from bnlab.diagnostics.weight_norms import in_units
from bnlab.schema import ConfigError
from bnlab.types import Array, Params


def data_loss(ctx: Any, batch_size: int):
    """`params -> mean over the batches of ctx.batch` of the training-mode loss, each batch of
    `batch_size` examples normalized with its own statistics; running statistics discarded."""
    images, labels = ctx.batch
    n = images.shape[0]
    if n % batch_size:
        raise ConfigError(
            f"diagnostics.batch_size={n} is not a multiple of "
            f"diagnostics.hessian_data_batch_size={batch_size}"
        )
    chunks = (
        images.reshape(n // batch_size, batch_size, *images.shape[1:]),
        labels.reshape(n // batch_size, batch_size),
    )
    rngs = measurement_rngs(ctx.rng)

    def loss(params: Params) -> Array:
        def one(batch, i):
            # Each batch its own dropout mask and noise, as consecutive training steps draw.
            own = {name: jax.random.fold_in(key, i) for name, key in rngs.items()}
            return model_loss(ctx.model, ctx.state.batch_stats, *batch, train=True, rngs=own)(
                params
            )

        return jnp.mean(jax.vmap(one)(chunks, jnp.arange(n // batch_size)))

    return loss


RESOLVED = 0.01  # a Ritz value is resolved when its residual is under 1% of its gap below


def bulk_edge(
    nodes: Array, weights: Array, residuals: Array, num_params: int, bulk_weight: float
) -> Array:
    """The bulk's upper edge, the median over probes of each probe's largest node in the bulk.

    A node is in the bulk when it stands for at least `bulk_weight` eigenvalues (weight >=
    `bulk_weight / num_params`) or Lanczos has not resolved it: its residual `||H y - theta y||`
    is not below `RESOLVED` times its distance to the next node down. The nodes near the end of
    a continuous bulk are light but unresolved; an outlier is light and resolved (its residual
    is tiny beside the gap that separates it). `nodes` ascending, `weights`, `residuals`:
    `f32[probes, iters]`. Where no node is in the bulk (a model small enough for Lanczos to
    resolve every eigenvalue), the smallest node.
    """
    gaps = nodes - jnp.concatenate([jnp.full_like(nodes[..., :1], -jnp.inf), nodes[..., :-1]], -1)
    in_bulk = (weights >= bulk_weight / num_params) | (residuals >= RESOLVED * gaps)
    in_bulk = in_bulk.at[..., 0].set(True)
    per_probe = jnp.max(jnp.where(in_bulk, nodes, -jnp.inf), axis=-1)
    return jnp.median(per_probe)


def top_eigen(matvec, v: Array, num_iters: int) -> tuple[Array, Array, Array, Array]:
    """Lanczos from `v`: `(nodes ascending, weights, Ritz vectors f32[n, iters] (columns, in
    the order of the nodes), residual norms ||H y_i - theta_i y_i||)`."""
    result = decomp.tridiag_sym(num_iters, reortho="full", custom_vjp=False)(matvec, v)
    nodes, vectors = eigh(result.J_small)
    residuals = jnp.linalg.norm(result.residual) * jnp.abs(vectors[-1])
    return nodes, vectors[0] ** 2, result.Q_tall.T @ vectors, residuals


def measure(ctx: Any) -> dict[str, Array]:
    """The quantities of the module docstring, under `hessian_data/`."""
    d = ctx.cfg.diagnostics
    loss_fn = data_loss(ctx, d.hessian_data_batch_size)
    loss_u, params_u = in_units(ctx, loss_fn, d.hessian_data_units)
    try:
        _check_sizes(params_u, d.hessian_data_num_iters, d.hessian_data_top_k)
    except ValueError as err:
        raise ConfigError(f"diagnostics.hessian_data_num_iters, hessian_data_top_k: {err}") from err
    flat, matvec = hessian_matvec(loss_u, params_u)
    n, k = flat.size, d.hessian_data_top_k
    probes = jax.random.normal(
        jax.random.fold_in(ctx.rng, 3), (d.hessian_data_num_probes, n), flat.dtype
    )
    # One probe after the other: a Hessian-vector product already runs every batch at once,
    # and a CNN over 10,240 examples holds that much in its backward pass per probe.
    nodes, weights, ritz, residuals = jax.lax.map(
        lambda v: top_eigen(matvec, v, d.hessian_data_num_iters), probes
    )
    edge = bulk_edge(nodes, weights, residuals, n, d.hessian_data_bulk_weight)
    top = nodes[0, ::-1][:k]
    basis = ritz[0][:, ::-1][:, :k]  # orthonormal: the top-k Ritz vectors of the first probe
    loss, grad = jax.value_and_grad(loss_u)(params_u)
    g = ravel_pytree(grad)[0]
    out = {
        "lambda_max": top[0],
        "top_eigenvalues": top,
        "density_nodes": nodes,
        "density_weights": weights,
        "bulk_edge": edge,
        "outliers": jnp.sum(nodes[0] > edge).astype(jnp.int32),
        "gradient_fraction": jnp.sum(jnp.square(basis.T @ g)) / jnp.sum(jnp.square(g)),
        "loss": loss,
    }
    if d.hessian_data_units == "raw" and ctx.lr is not None:
        out["edge_of_stability"] = jnp.asarray(ctx.lr, jnp.float32) * top[0] / 2
    return out

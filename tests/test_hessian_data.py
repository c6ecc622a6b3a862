"""`hessian_data`: the Hessian of the mean training loss over several batches, each normalized
with its own statistics, against its dense eigendecomposition; the bulk's edge and the outliers
on a spectrum of known shape; the scale-invariant units against `D H D` and a rescaled kernel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_diagnostics import batch, context, jit, measured, run_config, tiny_mlp  # noqa: F401

from bnlab import diagnostics, models
from bnlab.diagnostics import hessian_data

CHUNK = 8  # 4 batches of 8 examples: the loss is their mean
FIELDS = {
    "batch_size": 32,
    "hessian_data_batch_size": CHUNK,
    "hessian_data_num_iters": 60,
    "hessian_data_top_k": 3,
    "hessian_data_num_probes": 2,
}


def _ctx(batch, **fields):  # noqa: F811 - the fixture
    images = models.avg_pool2(models.avg_pool2(batch[0]))  # 7x7: 382 parameters
    cfg = run_config(**{**FIELDS, **fields})
    return context(tiny_mlp("autodiff", hidden=(6,)), (images, batch[1]), cfg=cfg)._replace(
        lr=jnp.float32(0.1)
    )


def _dense(ctx, scales=None):
    """Eigendecomposition of the dense Hessian of the mean of the 4 batches' training losses
    (forward-over-reverse `jax.hessian`, each batch written out by hand), and the gradient;
    with `scales`, of the loss of `u` at `w = scales * u`."""
    images, labels = ctx.batch
    flat, unravel = jax.flatten_util.ravel_pytree(ctx.state.params)
    d = np.ones_like(flat) if scales is None else jax.flatten_util.ravel_pytree(scales)[0]
    d = jnp.broadcast_to(d, flat.shape) if d.size == flat.size else d

    def loss(u):
        params = unravel(u * d)
        total = 0.0
        for i in range(0, images.shape[0], CHUNK):
            logits, _ = ctx.model.apply(
                {"params": params, "batch_stats": ctx.state.batch_stats},
                images[i : i + CHUNK],
                train=True,
                mutable=["batch_stats"],
            )
            total += optax.softmax_cross_entropy_with_integer_labels(
                logits, labels[i : i + CHUNK]
            ).mean()
        return total / (images.shape[0] // CHUNK)

    u = flat / d
    h = np.asarray(jit(jax.hessian(loss))(u), np.float64)
    g = np.asarray(jit(jax.grad(loss))(u), np.float64)
    values, vectors = np.linalg.eigh((h + h.T) / 2)
    return values[::-1], vectors[:, ::-1], g


def test_matches_the_dense_hessian_of_the_mean_over_batches(batch):  # noqa: F811
    ctx = _ctx(batch)
    out = measured(ctx, "hessian_data")
    values, vectors, g = _dense(ctx)
    top = np.asarray(out["hessian_data/top_eigenvalues"], np.float64)
    np.testing.assert_allclose(top, values[:3], rtol=1e-3)
    np.testing.assert_allclose(out["hessian_data/lambda_max"], values[0], rtol=1e-3)
    # The gradient's share in the top-3 eigenspace, from the dense eigenvectors.
    share = np.sum((vectors[:, :3].T @ g) ** 2) / np.sum(g**2)
    np.testing.assert_allclose(out["hessian_data/gradient_fraction"], share, atol=2e-3)
    eos = out["hessian_data/edge_of_stability"]
    np.testing.assert_allclose(eos, 0.1 * values[0] / 2, rtol=1e-3)
    assert out["hessian_data/density_nodes"].shape == (2, 60)
    # Not the Hessian of one batch of 32 normalized together: the batching is what it measures.
    one_batch = measured(ctx._replace(cfg=run_config(**{**FIELDS, "hessian_data_batch_size": 32})),
                         "hessian_data")  # fmt: skip
    assert abs(one_batch["hessian_data/lambda_max"] - values[0]) > 1e-2 * values[0]
    # The outliers are the first probe's nodes above the edge.
    nodes = np.asarray(out["hessian_data/density_nodes"])
    assert out["hessian_data/outliers"] == np.sum(nodes[0] > out["hessian_data/bulk_edge"])


def test_scale_invariant_units_are_d_h_d_and_ignore_a_rescaled_kernel(batch):  # noqa: F811
    ctx = _ctx(batch, hessian_data_units="scale_invariant")
    out = measured(ctx, "hessian_data")
    scales = jax.tree.map(lambda x: jnp.ones(x.shape), ctx.state.params)
    kernel = ctx.state.params["dense0"]["kernel"]
    scales["dense0"]["kernel"] = jnp.full(kernel.shape, jnp.linalg.norm(kernel))
    values, _, _ = _dense(ctx, scales)
    np.testing.assert_allclose(out["hessian_data/top_eigenvalues"], values[:3], rtol=1e-3)
    assert "hessian_data/edge_of_stability" not in out  # a raw-units quantity
    # BN follows dense0's kernel: scaled by 3, the raw curvature falls 9x, this one stays
    # (up to BN's epsilon, 1e-5 beside hidden variances of about 1e-2 here).
    params = ctx.state.params
    bigger = {**params, "dense0": {**params["dense0"], "kernel": 3 * kernel}}
    rescaled = ctx._replace(state=ctx.state._replace(params=bigger))
    np.testing.assert_allclose(
        measured(rescaled, "hessian_data")["hessian_data/top_eigenvalues"],
        out["hessian_data/top_eigenvalues"],
        rtol=5e-3,
    )
    raw = [measured(c._replace(cfg=run_config(**FIELDS)), "hessian_data") for c in (ctx, rescaled)]
    assert raw[1]["hessian_data/lambda_max"] < 0.5 * raw[0]["hessian_data/lambda_max"]


def test_hessian_units_scale_invariant_in_the_fixed_batch_diagnostic(batch):  # noqa: F811
    ctx = _ctx(batch)
    cfg = functools.partial(run_config, hessian_num_iters=60, hessian_top_k=2)
    raw = measured(ctx._replace(cfg=cfg()), "hessian")["hessian/top_eigenvalues"]
    si = measured(ctx._replace(cfg=cfg(hessian_units="scale_invariant")), "hessian")
    kernel = ctx.state.params["dense0"]["kernel"]
    assert float(jnp.linalg.norm(kernel)) != pytest.approx(1.0, abs=0.05)
    assert not np.allclose(si["hessian/top_eigenvalues"], raw, rtol=1e-2)
    # Invariant to rescaling the kernel that BN follows, as hessian_data's (up to epsilon).
    params = ctx.state.params
    bigger = {**params, "dense0": {**params["dense0"], "kernel": 3 * kernel}}
    rescaled = ctx._replace(state=ctx.state._replace(params=bigger))
    again = measured(rescaled._replace(cfg=cfg(hessian_units="scale_invariant")), "hessian")
    np.testing.assert_allclose(
        again["hessian/top_eigenvalues"], si["hessian/top_eigenvalues"], rtol=5e-3
    )


def test_bulk_edge_and_outliers_on_a_spectrum_of_known_shape():
    # 2000 eigenvalues: a bulk spread over [0, 1] and 5 outliers at 3 to 8.
    n = 2000
    eigenvalues = jnp.concatenate([jnp.linspace(0.0, 1.0, n - 5), jnp.array([3.0, 4, 5, 6, 8])])
    probes = jax.random.normal(jax.random.key(0), (4, n))
    nodes, weights, ritz, residuals = jax.vmap(
        lambda v: hessian_data.top_eigen(lambda x: eigenvalues * x, v, 90)
    )(probes)
    direct = jnp.linalg.norm(eigenvalues[:, None] * ritz[0] - ritz[0] * nodes[0], axis=0)
    np.testing.assert_allclose(residuals[0], direct, rtol=1e-2, atol=1e-5)
    edge = hessian_data.bulk_edge(nodes, weights, residuals, n, 10.0)
    assert 0.99 < edge <= 1.0
    assert int(jnp.sum(nodes[0] > edge)) == 5
    np.testing.assert_allclose(nodes[0, ::-1][:5], [8, 6, 5, 4, 3], rtol=1e-5)
    # The Ritz vectors of the outliers are the coordinate vectors of their eigenvalues.
    np.testing.assert_allclose(jnp.abs(ritz[0][:, -1][-1]), 1.0, rtol=1e-4)


def test_the_batch_must_split_into_whole_batches():
    problems = diagnostics.problems(
        diagnostics.diagnostics_config_class()(
            names="hessian_data", batch_size=1000, hessian_data_batch_size=128
        )
    )
    assert problems and "not a multiple of diagnostics.hessian_data_batch_size=128" in problems[0]


def test_vmapped_measurements_call_lapack_one_matrix_at_a_time(batch):  # noqa: F811
    """jaxlib's batched CPU eigh/svd split a batch over XLA's thread pool and wait for it; two
    at once on a 2-thread pool deadlocked a vmapped sweep. Every LAPACK call of the vmapped
    hessian, hessian_data and rank program must be unbatched (`num_batch_dims="0"`)."""
    from bnlab.diagnostics import common

    a = jax.random.normal(jax.random.key(0), (3, 2, 5, 5))
    a = a + jnp.swapaxes(a, -1, -2)
    w, v = jax.vmap(jax.vmap(common.eigh))(a)
    np.testing.assert_array_equal(w, jnp.linalg.eigh(a)[0])
    np.testing.assert_array_equal(jnp.abs(v), jnp.abs(jnp.linalg.eigh(a)[1]))
    np.testing.assert_allclose(
        jax.vmap(common.singular_values)(a[0]), jnp.linalg.svd(a[0], compute_uv=False)
    )
    ctx = _ctx(batch, hessian_num_iters=8, hessian_top_k=2)
    names = ("hessian", "hessian_data", "rank")

    def fn(state, rng):
        return diagnostics.measure(ctx._replace(state=state, rng=rng), names)

    states = jax.tree.map(lambda x: jnp.stack([x, x, x]), ctx.state)
    rngs = jax.random.split(ctx.rng, 3)
    hlo = jax.jit(jax.vmap(fn)).lower(states, rngs).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack' in line]
    assert calls and all('num_batch_dims="0"' in line for line in calls), calls[:2]


def test_landscape_in_scale_invariant_units_ignores_a_rescaled_kernel(batch):  # noqa: F811
    ctx = _ctx(batch)
    params = ctx.state.params
    kernel = params["dense0"]["kernel"]
    bigger = {**params, "dense0": {**params["dense0"], "kernel": 3 * kernel}}
    rescaled = ctx._replace(state=ctx.state._replace(params=bigger))
    fields = {"landscape_scale": "absolute", "landscape_step_sizes": (0.05, 0.1, 0.2)}
    keys = ("loss_range", "grad_predictiveness", "beta_smoothness")

    def measure(c, units):
        out = measured(c._replace(cfg=run_config(**fields, landscape_units=units)), "landscape")
        return np.array([out[f"landscape/{k}"] for k in keys])

    si, si_rescaled = measure(ctx, "scale_invariant"), measure(rescaled, "scale_invariant")
    np.testing.assert_allclose(si_rescaled, si, rtol=5e-3)  # up to BN's epsilon, as above
    raw, raw_rescaled = measure(ctx, "raw"), measure(rescaled, "raw")
    assert not np.allclose(raw_rescaled, raw, rtol=5e-2)
    # In u = w / ||W|| the steps and gradients are those of D: by hand for the loss range.
    norm = jnp.linalg.norm(kernel)
    scales = jax.tree.map(lambda x: jnp.ones(()), params)
    scales["dense0"] = {**scales["dense0"], "kernel": norm}
    loss = hessian_data.data_loss(ctx._replace(batch=ctx.batch), 32)

    def loss_u(u):
        return loss(jax.tree.map(jnp.multiply, u, scales))

    u = jax.tree.map(jnp.divide, params, scales)
    g = jax.grad(loss_u)(u)
    values = [loss_u(jax.tree.map(lambda a, b, e=e: a - e * b, u, g)) for e in (0.05, 0.1, 0.2)]
    np.testing.assert_allclose(si[0], max(values) - min(values), rtol=1e-3)

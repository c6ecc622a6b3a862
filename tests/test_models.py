"""Models: im2col convolution equals flax's, pooling takes 2x2 block means, norms injected."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import layers, models


@pytest.mark.parametrize("shape, features", [((4, 28, 28, 1), 32), ((3, 7, 5, 6), 4)])
@jax.default_matmul_precision("float32")  # GPUs default to TF32 for float32 matmuls
def test_im2col_conv_equals_flax_conv(shape, features):
    x = jax.random.normal(jax.random.key(0), shape)
    ours = models.Conv(features)
    ref = nn.Conv(features, (3, 3), padding="SAME")
    variables = ref.init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(1), x))
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)

    def grads(module):
        return jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1))(
            variables, x
        )

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads(ours), grads(ref)
    )
    xla = models.Conv(features, impl="xla")
    np.testing.assert_allclose(xla.apply(variables, x), ref.apply(variables, x), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_avg_pool2_is_the_2x2_block_mean(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), dtype)  # odd rows: VALID drops one
    got = models.avg_pool2(x)
    assert got.dtype == dtype and got.shape == (2, 3, 3, 3)
    blocks = np.asarray(x, np.float64)[:, :6].reshape(2, 3, 2, 3, 2, 3)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == jnp.float32 else {"rtol": 1e-2, "atol": 1e-2}
    np.testing.assert_allclose(np.asarray(got, np.float64), blocks.mean(axis=(2, 4)), **tol)
    # The gradient under jit, as in training: each input of a block gets a quarter of the
    # block's cotangent, the dropped row none.
    ct = jax.random.normal(jax.random.key(1), got.shape, dtype)
    grad = jax.jit(lambda v: jax.vjp(models.avg_pool2, v)[1](ct)[0])(x)
    want = np.zeros(x.shape)
    want[:, :6] = np.repeat(np.repeat(np.asarray(ct, np.float64) / 4, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(grad, np.float64), want)


def _variables(model, x):
    return model.init(jax.random.key(0), x, train=False)


def test_cnn_with_and_without_batchnorm():
    x = jnp.ones((2, 28, 28, 1))
    with_bn = _variables(models.CNN(norm=layers.BatchNorm), x)
    without = _variables(models.CNN(norm=layers.Identity), x)
    assert set(with_bn["batch_stats"]) == {"block0", "block1", "block2"}
    assert with_bn["batch_stats"]["block1"]["norm"]["mean"].shape == (64,)
    assert "batch_stats" not in without
    assert jax.tree.structure(with_bn["params"]["conv0"]) == jax.tree.structure(
        without["params"]["conv0"]
    )


def test_mlp_is_the_paper_network():
    variables = _variables(models.MLP(norm=layers.BatchNorm), jnp.ones((2, 28, 28, 1)))
    kernels = [variables["params"][f"dense{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(784, 100), (100, 100), (100, 100)]
    assert variables["params"]["head"]["kernel"].shape == (100, 10)


def test_placement_before_and_after_differ_as_defined():
    x = jax.random.normal(jax.random.key(1), (8, 5))
    for placement, expected in (
        ("before", lambda z: nn.sigmoid((z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5))),
        (
            "after",
            lambda z: (
                (nn.sigmoid(z) - nn.sigmoid(z).mean(0)) / jnp.sqrt(nn.sigmoid(z).var(0) + 1e-5)
            ),
        ),
    ):
        block = models._NormAct(layers.BatchNorm, nn.sigmoid, placement)
        v = block.init(jax.random.key(0), x, train=False)
        y, _ = block.apply(v, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, expected(x), rtol=1e-4, atol=1e-5)


def test_unknown_norm_lists_known():
    from bnlab import norms

    with pytest.raises(ValueError, match=r"model.norm='spectral' is not one of \[.*'batchnorm'"):
        norms.get("spectral")


def test_unknown_placement_is_an_error():
    block = models._NormAct(layers.BatchNorm, nn.relu, "middle")
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        block.init(jax.random.key(0), jnp.ones((2, 3)), train=False)


def test_mlp_depth_and_width_build_the_model_and_its_checks():
    from bnlab import config
    from bnlab.training import train

    cfg = config.validate(
        config.apply_overrides(
            config.default_config(),
            {"model.name": "mlp", "model.mlp_depth": "5", "model.mlp_width": "12"},
        )
    )
    variables = train.build_model(cfg).init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), False)
    kernels = [variables["params"][f"dense{i}"]["kernel"].shape for i in range(5)]
    assert kernels == [(784, 12)] + [(12, 12)] * 4 and "dense5" not in variables["params"]
    assert variables["batch_stats"]["block4"]["norm"]["mean"].shape == (12,)
    # The normalization's checks see these widths: 5 groups do not divide 12 units.
    bad = {"model.name": "mlp", "model.mlp_width": "12", "model.norm": "groupnorm",
           "norm.num_groups": "5"}  # fmt: skip
    with pytest.raises(config.ConfigError, match="12"):
        config.validate(config.apply_overrides(config.default_config(), bad))

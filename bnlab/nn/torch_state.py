"""Each normalization's variables as PyTorch `state_dict` entries (`NormSpec.torch`).

numpy only, imported inside the functions: `bnlab.export` calls them, `import bnlab` stays light.
"""


def _torch_affine(key: str, params: dict, shape: tuple[int, ...] = ()) -> dict:
    """`scale`/`bias` as PyTorch's `weight`/`bias`, broadcast to `shape` when given."""
    import numpy as np

    out = {}
    for name, torch_name in (("scale", "weight"), ("bias", "bias")):
        if name in params:
            value = np.asarray(params[name])
            if shape:  # channels first, broadcast over the rest
                value = np.broadcast_to(value.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
            out[f"{key}.{torch_name}"] = value
    return out


def torch_batchnorm(key: str, params: dict, stats: dict, n, shape, *, step: int) -> dict:
    """`torch.nn.BatchNorm{1,2}d` entries: weight/bias (if affine), running_mean/var, and
    `num_batches_tracked` (a 0-d int64, as PyTorch stores it)."""
    import numpy as np

    del n, shape  # BN's entries do not depend on them
    out = _torch_affine(key, params)
    out[f"{key}.running_mean"] = stats["mean"]
    out[f"{key}.running_var"] = stats["var"]
    out[f"{key}.num_batches_tracked"] = np.asarray(step, np.int64)
    return out


def torch_layernorm(key: str, params: dict, stats: dict, n, shape, *, step: int) -> dict:
    """`torch.nn.LayerNorm(normalized_shape)` entries, with `normalized_shape` the layer's
    input shape without the batch axis in PyTorch's order (channels first: `(C, H, W)` for an
    NHWC input) and `scale`/`bias` broadcast to it."""
    del stats, n, step  # no running statistics
    if shape is None:
        raise ValueError(
            f"{key}: a LayerNorm's PyTorch weights span its input shape; pass the shapes "
            "(bnlab.export.norm_input_shapes) to the export."
        )
    return _torch_affine(key, params, (shape[-1], *shape[:-1]))


def torch_groupnorm(key: str, params: dict, stats: dict, n, shape, *, step: int) -> dict:
    """`torch.nn.GroupNorm` entries: weight and bias per channel."""
    del stats, n, shape, step  # no running statistics; per-channel weights
    return _torch_affine(key, params)

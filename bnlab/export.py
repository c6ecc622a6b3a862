"""A run's weights out of its checkpoint: `.npz` in bnlab's layout, or a PyTorch `state_dict`.

npz keys are `params/<module path>/<name>` and `batch_stats/<module path>/<name>` (`/`-joined
flax paths), plus `step`. The PyTorch `state_dict` names each module by its flax path joined
with `.` (`dense0.weight`, `block0.norm.running_mean`) and uses PyTorch's layouts: `Linear`
weights are `[out, in]`, `Conv2d` weights `[out, in, kh, kw]`, and the CNN's first dense layer
reads a `torch.flatten` of NCHW feature maps. BN's `scale`/`bias`/`mean`/`var` become
`weight`/`bias`/`running_mean`/`running_var` (both frameworks normalize with the stored variance
at evaluation, so the values carry over) and `num_batches_tracked` is the step count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.config import ConfigError

FORMATS = {"npz": ".npz", "torch": ".pt"}  # format -> default file suffix
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """`{"a": {"b": x}}` -> `{"a/b": x}` (host arrays)."""
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_npz(path: str | os.PathLike, params, batch_stats, *, step: int) -> None:
    arrays = {**flatten({"params": params}), **flatten({"batch_stats": batch_stats})}
    with open(path, "wb") as f:
        np.savez(f, step=np.asarray(step), **arrays)


def load_npz(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """`(params, batch_stats, step)` of an exported `.npz`, ready for `model.apply`."""
    with np.load(path) as npz:
        tree = unflatten({k: npz[k] for k in npz.files if k != "step"})
        return tree.get("params", {}), tree.get("batch_stats", {}), int(npz["step"])


def to_torch_layout(params, batch_stats, *, step: int) -> dict[str, np.ndarray]:
    """The PyTorch `state_dict` of bnlab's MLP or CNN, as numpy arrays (see the module doc)."""
    flat = flatten(params)
    stats = flatten(batch_stats)
    out: dict[str, np.ndarray] = {}
    feature_map = _cnn_feature_map(params)
    for path, value in flat.items():
        module, name = path.rsplit("/", 1)
        key = module.replace("/", ".")
        if name == "kernel" and value.ndim == 4:  # HWIO -> OIHW
            out[f"{key}.weight"] = value.transpose(3, 2, 0, 1)
        elif name == "kernel":
            if module == "dense" and feature_map is not None:  # rows HWC -> CHW
                h, w, c = feature_map
                value = value.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
            out[f"{key}.weight"] = value.T
        elif module.endswith("norm"):
            out[f"{key}.{_BN_NAMES[name]}"] = value
        else:
            out[f"{key}.{name}"] = value
    for path, value in stats.items():
        module, name = path.rsplit("/", 1)
        key = module.replace("/", ".")
        out[f"{key}.{_BN_NAMES[name]}"] = value
        if name == "mean":
            out[f"{key}.num_batches_tracked"] = np.asarray(step, np.int64)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _cnn_feature_map(params) -> tuple[int, int, int] | None:
    """(H, W, C) of the CNN's last feature map (what its `dense` layer reads), else None."""
    if "conv1" not in params or "dense" not in params:
        return None
    channels = params["conv1"]["kernel"].shape[-1]
    side = math.isqrt(params["dense"]["kernel"].shape[0] // channels)
    return side, side, channels


def export(
    workdir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    step: int | None = None,
) -> Path:
    """Writes the params and batch_stats of a run's latest good checkpoint (or `step`) to `out`
    (default `WORKDIR/export<suffix>`); returns the path."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {sorted(FORMATS)}.")
    from bnlab.run import load_checkpoint

    _, restored = load_checkpoint(workdir, step=step)
    out = Path(out) if out is not None else Path(workdir) / f"export{FORMATS[fmt]}"
    params, batch_stats = restored.state.params, restored.state.batch_stats
    if fmt == "npz":
        save_npz(out, params, batch_stats, step=restored.step)
        return out
    try:
        import torch
    except ImportError as err:
        raise ConfigError(
            "--format torch needs PyTorch: pip install 'bnlab[torch]' (or use --format npz)."
        ) from err
    layout = to_torch_layout(params, batch_stats, step=restored.step)
    torch.save({k: torch.tensor(v) for k, v in layout.items()}, out)
    return out

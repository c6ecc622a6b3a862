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

import functools
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from bnlab.config import ConfigError
from bnlab.nn import norms

FORMATS = {"npz": ".npz", "torch": ".pt"}  # format -> default file suffix
NORM_MODULE = "norm"  # the models name every normalization layer `.../norm`


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """`{"a": {"b": x}}` -> `{"a/b": x}` (host arrays)."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def save_npz(path: str | os.PathLike, params, batch_stats, *, step: int) -> None:
    arrays = {**flatten({"params": params}), **flatten({"batch_stats": batch_stats})}
    with open(path, "wb") as f:
        np.savez(f, step=np.asarray(step), **arrays)


def load_npz(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """`(params, batch_stats, step)` of an exported `.npz`, ready for `model.apply`."""
    with np.load(path) as npz:
        tree = unflatten({k: npz[k] for k in npz.files if k != "step"})
        return tree.get("params", {}), tree.get("batch_stats", {}), int(npz["step"])


def to_torch_layout(
    params, batch_stats, *, step: int, cfg=None, shapes: dict[str, tuple] | None = None
) -> dict[str, np.ndarray]:
    """The PyTorch `state_dict` of bnlab's MLP or CNN, as numpy arrays (see the module doc).

    The normalization layers (`.../norm` modules) are written by the registry entry of
    `cfg.model.norm` (BN when `cfg` is None); `shapes` are their input shapes without the batch
    axis, by module path, for layers whose PyTorch weights span them (LayerNorm).
    """
    spec = norms.get(cfg.model.norm if cfg is not None else "batchnorm")
    flat_params, flat_stats = flatten(params), flatten(batch_stats)
    norm_params: dict[str, dict] = {}
    out: dict[str, np.ndarray] = {}
    feature_map = _cnn_feature_map(params)
    for path, value in flat_params.items():
        module, name = path.rsplit("/", 1)
        key = module.replace("/", ".")
        if module.rsplit("/", 1)[-1] == NORM_MODULE:
            norm_params.setdefault(module, {})[name] = value
        elif name == "kernel" and value.ndim == 4:  # HWIO -> OIHW
            out[f"{key}.weight"] = value.transpose(3, 2, 0, 1)
        elif name == "kernel":
            if module == "dense" and feature_map is not None:  # rows HWC -> CHW
                h, w, c = feature_map
                value = value.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
            out[f"{key}.weight"] = value.T
        else:
            out[f"{key}.{name}"] = value
    norm_stats: dict[str, dict] = {}
    for path, value in flat_stats.items():
        module, name = path.rsplit("/", 1)
        norm_stats.setdefault(module, {})[name] = value
    for module in sorted(set(norm_params) | set(norm_stats)):
        if spec.torch is None:
            raise ConfigError(
                f"PyTorch has no layer equal to model.norm={cfg.model.norm!r}, so this run "
                "cannot be exported as a state_dict; use --format npz."
            )
        shape = (shapes or {}).get(module)
        out.update(
            spec.torch(
                module.replace("/", "."),
                norm_params.get(module, {}),
                norm_stats.get(module, {}),
                None if cfg is None else cfg.norm,
                shape,
                step=step,
            )
        )
    # np.array keeps 0-d arrays 0-d (num_batches_tracked), unlike np.ascontiguousarray.
    return {k: np.array(v, order="C") for k, v in out.items()}


def norm_input_shapes(model, sample) -> dict[str, tuple[int, ...]]:
    """Input shape (batch axis dropped) of every normalization layer of `model`, by path."""
    import jax

    def shapes(x):
        _, state = model.apply(
            model.init(jax.random.key(0), x, train=False),
            x,
            train=False,
            capture_intermediates=lambda mdl, method: (
                mdl.name == NORM_MODULE and method == "__call__"
            ),
            mutable=["intermediates"],
        )
        return state["intermediates"]

    flat = traverse_util.flatten_dict(jax.eval_shape(shapes, sample), sep="/")
    return {
        k.rsplit("/__call__", 1)[0]: tuple(v[0].shape[1:]) if isinstance(v, tuple) else v.shape[1:]
        for k, v in flat.items()
    }


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
    force: bool = False,
) -> Path:
    """Writes the params and batch_stats of a run's latest good checkpoint (or `step`) to `out`
    and returns its path.

    Args:
      workdir: a training workdir (with `config.json` and `checkpoints/`).
      fmt: "npz" (bnlab's layout) or "torch" (a PyTorch `state_dict`, see the module doc).
      out: the file to write; a folder (created if missing) receives `export<suffix>`.
        Default: `WORKDIR/export<suffix>`. Inside the run's folder only a file of its own
        (`<name>.npz` or `<name>.pt`, beside config.json) may be written.
      step: this checkpoint instead of the latest good one.
      force: replace `out` if it exists (else an existing file is refused).

    Raises:
      ConfigError: an unknown format, a normalization PyTorch lacks, PyTorch not installed, or
        an `out` that exists, is one of the run's files or cannot be written (the message says
        what to do). Nothing is written then; a replaced file is replaced whole or not at all.
      CheckpointError: no such run, step or readable checkpoint.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {sorted(FORMATS)}.")
    from bnlab.training.run import load_checkpoint

    path = _output_path(Path(workdir), f"export{FORMATS[fmt]}", out, force=force)
    cfg, restored = load_checkpoint(workdir, step=step)
    params, batch_stats = restored.state.params, restored.state.batch_stats
    if fmt == "npz":
        write = functools.partial(
            save_npz, params=params, batch_stats=batch_stats, step=restored.step
        )
    else:
        write = _torch_writer(cfg, params, batch_stats, restored.step)
    _make_folders(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:  # whole or not at all: a failed write leaves an existing file as it was
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"cannot write {path} ({err.strerror}); pass another --out.") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _torch_writer(cfg, params, batch_stats, step: int):
    """`write(path)` of the run's PyTorch state_dict; refuses before anything is written."""
    if norms.get(cfg.model.norm).torch is None:
        raise ConfigError(
            f"PyTorch has no layer equal to model.norm={cfg.model.norm!r}, so this run cannot be "
            "exported as a state_dict; use --format npz."
        )
    try:
        import torch
    except ImportError as err:
        raise ConfigError(
            "--format torch needs PyTorch, which is not installed here: pip install torch==2.13.0 "
            "(the version bnlab is tested with; in a checkout, .venv/bin/pip install -c "
            "constraints.txt -e '.[torch]' does the same), or use --format npz."
        ) from err
    from bnlab.training import train as train_lib

    model = train_lib.build_model(cfg)
    sample = np.zeros((1, 28, 28, 1), np.float32)
    layout = to_torch_layout(
        params, batch_stats, step=step, cfg=cfg, shapes=norm_input_shapes(model, sample)
    )
    state_dict = {k: torch.tensor(v) for k, v in layout.items()}

    def write(path: Path) -> None:
        with open(path, "wb") as f:  # an unwritable path fails here, as an OSError
            torch.save(state_dict, f)

    return write


def _output_path(workdir: Path, name: str, out: str | os.PathLike | None, *, force: bool) -> Path:
    """Where an export goes: `out`, `out/name` for a folder, else `workdir/name`; refuses an
    existing file (unless `force`) and any of the run's own files."""
    from bnlab.training.workdir import EXPORT_SUFFIXES  # what a run's folder may hold besides

    path = workdir / name if out is None else Path(out)
    if path.is_dir():
        path = path / name
    try:
        inside = path.resolve().relative_to(workdir.resolve()).parts
    except ValueError:
        inside = ()
    if inside and (len(inside) > 1 or not path.name.endswith(EXPORT_SUFFIXES)):
        raise ConfigError(
            f"--out {path} is among the run's own files in {workdir}; an export never writes "
            f"there. Pass an --out outside it, or a new <name>{FORMATS['npz']} / "
            f"<name>{FORMATS['torch']} file directly in it."
        )
    if path.exists() and not force:
        raise ConfigError(
            f"{path} exists; pass --force to replace it, or another --out. Nothing was written."
        )
    return path


def _make_folders(path: Path) -> None:
    """Creates the folders on the way to `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the folder {path.parent} for the export ({err.strerror}); pass an "
            "--out in a writable folder."
        ) from err

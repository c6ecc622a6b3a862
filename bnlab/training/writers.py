"""Run outputs: metrics.jsonl (one JSON record per line), TensorBoard events, JSON files."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """numpy/jax scalars to Python numbers; NaN and infinities to None (JSON null)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; the run's status says it diverged
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    # A temporary name of this process: shards writing one sweep.json must not share it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics file; a partial last line (a killed writer) is skipped with a
    warning."""
    return [record for _, record in _jsonl_lines(path)]


def _jsonl_lines(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(
                    f"{path}: line {i + 1} is not valid JSON; only a partial last line (from a "
                    "killed writer) is tolerated. Repair or delete that line."
                ) from None
            warnings.warn(
                f"{path}: skipped the partial last line {i + 1} (a writer killed mid-record).",
                stacklevel=3,
            )
    return records


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Keeps the records of a metrics file up to step `last_step` (and drops a partial last
    line), byte for byte, atomically; returns how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial line is dropped here on purpose
        lines = _jsonl_lines(path)
    kept = [line for line, record in lines if record["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


# Fields that locate a record (its epoch, how many steps it averages) rather than measure the
# run: metrics.jsonl keeps them, TensorBoard would only draw them as curves.
NOT_CURVES = frozenset({"epoch", "window"})


def summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors, which
    bnlab never passes: that import alone took 1.3-2 s of a run's start-up. Unless torch is
    already loaded, it is hidden while tensorboardX loads (`None` in `sys.modules` makes
    `import torch` raise ImportError, which tensorboardX handles), and unhidden after.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends records to `metrics.jsonl` and mirrors finite scalars to TensorBoard
    (tensorboardX); a non-finite value is `null` in the file and left out of TensorBoard."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        tensorboard: bool = True,
        *,
        purge_step: int | None = None,  # a resumed run: TensorBoard drops older events >= it
    ):
        self._file = open(Path(workdir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            self._tb = summary_writer_class()(
                str(Path(workdir) / "tensorboard"), purge_step=purge_step
            )

    def write(self, step: int, split: str, **metrics: Any) -> None:
        record = _plain({"step": int(step), "split": split, **metrics})
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                scalar = isinstance(value, int | float | np.floating | np.integer) or not np.ndim(
                    value
                )
                if scalar and name not in NOT_CURVES and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

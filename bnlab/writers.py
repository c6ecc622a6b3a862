"""Run outputs: metrics.jsonl (one JSON record per line), TensorBoard events, JSON files."""

from __future__ import annotations

import json
import math
import os
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics file; a partial last line (a killed writer) is skipped."""
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


class MetricWriter:
    """Appends records to `metrics.jsonl` and mirrors scalars to TensorBoard (tensorboardX)."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self._file = open(Path(workdir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, **metrics: Any) -> None:
        record = _plain({"step": int(step), "split": split, **metrics})
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float | np.floating | np.integer) or np.ndim(value) == 0:
                    self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

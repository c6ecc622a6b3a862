"""TensorBoard gets the finite metrics of a record, not its bookkeeping (epoch, window) and not
NaN or infinity (tensorboardX would log a warning for each); metrics.jsonl keeps everything."""

import struct

import numpy as np
import pytest

from bnlab.training.writers import MetricWriter, read_jsonl


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """`tag -> [(step, value)]` of the event files in `folder` (TFRecord frames of Events)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # u64 length, u32 crc, the Event, u32 crc
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_gets_finite_metrics_without_bookkeeping(tmp_path, caplog):
    writer = MetricWriter(tmp_path)
    writer.write(10, "train", loss=0.5, accuracy=np.float32(0.25), grad_norm=np.nan, epoch=0,
                 window=10)  # fmt: skip
    writer.write(20, "train", loss=np.inf, accuracy=0.75, epoch=0, window=10)
    writer.write(20, "test", loss=1.5, accuracy=0.5, epoch=0)
    writer.close()
    assert _scalars(tmp_path / "tensorboard") == {
        "train/loss": [(10, 0.5)],
        "train/accuracy": [(10, 0.25), (20, 0.75)],
        "test/loss": [(20, 1.5)],
        "test/accuracy": [(20, 0.5)],
    }
    assert "NaN or Inf" not in caplog.text
    first, second, test = read_jsonl(tmp_path / "metrics.jsonl")
    assert (first["epoch"], first["window"], first["grad_norm"]) == (0, 10, None)
    assert second["loss"] is None and test["epoch"] == 0
    assert first["accuracy"] == pytest.approx(0.25)

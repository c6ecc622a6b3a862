"""Run files: strict JSON (no NaN), atomic writes, a partial last metrics line is skipped."""

import json
import math

import pytest

from bnlab.training.writers import MetricWriter, read_jsonl, truncate_jsonl, write_json


def test_nonfinite_numbers_become_null(tmp_path):
    write_json(tmp_path / "s.json", {"loss": math.nan, "acc": 0.5, "x": [math.inf, 1]})
    assert json.loads((tmp_path / "s.json").read_text()) == {
        "loss": None,
        "acc": 0.5,
        "x": [None, 1],
    }
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, "train", loss=math.nan, accuracy=0.25)
    writer.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record == {"step": 3, "split": "train", "loss": None, "accuracy": 0.25}
    assert not list(tmp_path.glob(".*.tmp"))


def test_partial_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="skipped the partial last line 3"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_truncate_keeps_records_up_to_a_step_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 4, "split": "train"}', '{"step": 10, "split": "test"}', '{"step": 12}']
    path.write_text("\n".join(lines) + '\n{"step": 1')
    assert truncate_jsonl(path, 10) == 1  # the record past step 10; the partial line goes too
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"

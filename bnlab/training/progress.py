"""What a person watching a run sees: on a terminal, a bar of steps with the latest loss,
accuracy, examples/s and an ETA, redrawn after every chunk; elsewhere (a log file, a notebook
without widgets, a terminal of unknown width), one line per log window and per evaluation.

The loop ends a chunk about every `train.progress_seconds` (5 s by default), so the bar moves
and each line is printed within a few seconds of its step, with the speed of the latest chunk
and the ETA from that line's step.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _is_terminal(stream: TextIO) -> bool:
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return interactive and shutil.get_terminal_size((0, 0)).columns > 0


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Feeds on one run's records (`on_record`) and chunk ends (`on_chunk`)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        batch_size: int,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        speed: Callable[[], float | None] | None = None,
    ):
        """`speed`: the run's current examples/s, read at every line and redraw (default:
        the throughput of the compiled steps that `on_chunk` reports)."""
        self.total, self.step, self.batch_size = total_steps, start_step, batch_size
        self.speed = speed
        self.stream = sys.stderr if stream is None else stream
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.latest: dict[str, Any] = {}
        self.examples_per_s: float | None = None
        self._bar = None
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                desc="train",
                file=self.stream,
                dynamic_ncols=True,
            )

    def on_record(self, step: int, split: str, values: dict[str, Any]) -> None:
        """A record the run wrote: remembered for the bar, or printed as a line."""
        self.latest[split] = values
        if self.terminal or split == "diag":
            return
        if split == "train":
            line = (
                f"step {step}/{self.total}  loss {values['loss']:.4f}  "
                f"acc {values['accuracy']:.4f}{self._speed(step)}"
            )
        else:
            line = f"step {step}/{self.total}  {split}: loss {values['loss']:.4f}  " + (
                f"acc {values['accuracy']:.4f}"
            )
        print(line, file=self.stream, flush=True)

    def on_chunk(self, step: int, train_time_s: float, timed_steps: int) -> None:
        """The run reached `step`; its compiled steps so far took `train_time_s`."""
        if timed_steps and train_time_s > 0:
            self.examples_per_s = timed_steps * self.batch_size / train_time_s
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix_str(self._postfix(), refresh=True)
        self.step = step

    def _examples_per_s(self) -> float | None:
        return self.speed() if self.speed is not None else self.examples_per_s

    def _speed(self, step: int) -> str:
        speed = self._examples_per_s()
        if not speed:
            return ""
        eta = (self.total - step) * self.batch_size / speed
        return f"  {speed:,.0f} ex/s  eta {_duration(eta)}"

    def _postfix(self) -> str:
        parts = []
        train = self.latest.get("train")
        if train:
            parts.append(f"loss {train['loss']:.4f} acc {train['accuracy']:.3f}")
        for split in ("validation", "test"):
            if split in self.latest:
                parts.append(f"{split} acc {self.latest[split]['accuracy']:.4f}")
        speed = self._examples_per_s()
        if speed:
            eta = (self.total - self.step) * self.batch_size / speed
            parts.append(f"{speed:,.0f} ex/s, eta {_duration(eta)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Clock:
    """Seconds spent compiling (tracing, lowering, XLA compilation or reading its cache), from
    JAX's monitoring events: a chunk's training time is its wall time minus these, so even a
    run's first chunk (compiled on the spot) measures throughput."""

    _total = 0.0
    _registered = False

    @classmethod
    def compile_seconds(cls) -> float:
        if not cls._registered:
            import jax

            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True
        return cls._total

    @classmethod
    def _listen(cls, event: str, duration: float, **kwargs: Any) -> None:
        del kwargs  # event details
        if event.startswith("/jax/core/compile/"):  # the cache is read within backend_compile
            cls._total += duration


def now() -> float:
    return time.perf_counter()

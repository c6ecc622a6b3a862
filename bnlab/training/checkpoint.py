"""Checkpoints of a run with orbax: atomic saves, the last k kept (and the best), verified
restores that fall back past a damaged checkpoint, never silently.

A checkpoint `WORKDIR/checkpoints/<step>/` holds two items: `state` (the `TrainState` arrays)
and `meta` (JSON: the resolved config, the run's progress, the state's tree signature, a
SHA-256 digest of its bytes and one of the JSON itself). orbax writes each checkpoint into a
temporary folder and renames it when complete, so a kill mid-save leaves no checkpoint that
looks complete; the digests catch damage that orbax's own reader would not, in the arrays and
in the progress alike.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from bnlab.config import CheckpointConfig
from bnlab.types import PyTree

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints.corrupt"  # damaged checkpoints moved aside on resume, for inspection
META_DIGEST = "meta_digest"  # the metadata's entry holding the digest of the rest of it


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or restored; the message says what to do."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


class Restored(NamedTuple):
    step: int
    state: PyTree  # the saved pytree, with the target's structure (e.g. a `TrainState`)
    meta: dict[str, Any]  # the JSON saved with it


def signature(tree: PyTree) -> list[list]:
    """`[path, shape, dtype]` of every leaf: what must match for a checkpoint to fit a model."""
    return [
        [jax.tree_util.keystr(path), list(np.shape(leaf)), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def digest(tree: PyTree) -> str:
    """SHA-256 over the leaves' paths, dtypes, shapes and bytes (host copies)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        leaf = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of `meta` as JSON (keys sorted), leaving out its own `meta_digest` entry."""
    rest = {k: v for k, v in meta.items() if k != META_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _score(metrics: dict[str, float], best_metric: str) -> float:
    # Higher is better; a non-finite metric (a diverged epoch) ranks last.
    value = metrics[best_metric] if best_metric == "accuracy" else -metrics[best_metric]
    return value if math.isfinite(value) else -math.inf


class Checkpointer:
    """Saves and restores the checkpoints in one folder (`WORKDIR/checkpoints`)."""

    def __init__(
        self, directory: str | os.PathLike, cfg: CheckpointConfig, *, read_only: bool = False
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = cfg.best_metric
        policies = [checkpoint_managers.LatestN(cfg.keep)]
        if cfg.best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["score"], n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,  # the next chunk donates the state's buffers
            create=not read_only,  # (orbax's read_only mode logs warnings on every use)
            cleanup_tmp_directories=not read_only,  # a killed save's temporary folder
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        )
        if read_only and not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints in {self.directory}: it does not exist. Pass the workdir of a "
                "run that saved checkpoints (checkpoint.every_steps, or its end)."
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: PyTree, meta: dict[str, Any], test: dict[str, float] | None = None
    ) -> None:
        """Saves `state` and `meta` as checkpoint `step` (replacing a damaged one of that step);
        `test` metrics rank it for `best_metric`. A failed write raises `CheckpointError` and
        leaves the earlier checkpoints as they were."""
        meta = {**meta, "step": int(step), "signature": signature(state), "digest": digest(state)}
        meta[META_DIGEST] = meta_digest(meta)
        metrics = None
        if self.best_metric and test:
            metrics = {"score": _score(test, self.best_metric)}
        try:
            with _quiet(logging.getLogger("absl")):  # a failure is raised below, once
                self._manager.save(
                    int(step),
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                    metrics=metrics,
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as err:
            for tmp in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)  # the half-written checkpoint
            if isinstance(err, OSError):
                raise self._save_error(step, err) from err
            if "No space left" in str(err) or "ENOSPC" in str(err):  # orbax/tensorstore's types
                raise self._save_error(step, OSError(errno.ENOSPC, str(err))) from err
            raise

    def _save_error(self, step: int, err: OSError) -> CheckpointError:
        reason = "the disk is full" if err.errno == errno.ENOSPC else f"the write failed ({err})"
        kept = self.steps()
        return CheckpointError(
            f"could not save checkpoint {step} in {self.directory}: {reason}. The earlier "
            f"checkpoints ({', '.join(map(str, kept)) or 'none'}) are intact. Free space (or fix "
            "the folder) and run the same command again to resume from the latest one."
        )

    def restore(self, target: PyTree, *, step: int | None = None) -> Restored:
        """Checkpoint `step`, or the latest good one: a damaged checkpoint gives a
        `CheckpointWarning` naming it and the previous one is tried; none good (or a checkpoint
        of another model) raises `CheckpointError`."""
        saved = self.steps()
        if step is not None and step not in saved:
            raise CheckpointError(
                f"{self.directory} has no checkpoint of step {step}; its checkpoints are of steps "
                f"{', '.join(map(str, saved)) or '(none)'}. Pass one of those (--step), or no "
                "step for the latest good one."
            )
        steps = saved if step is None else [step]
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}.")
        problems = []
        for s in reversed(steps):
            try:
                return self._restore_one(s, target)
            except _Damaged as err:
                problems.append(f"{s}: {err}")
                if step is None and s != steps[0]:
                    warnings.warn(
                        f"checkpoint {self.directory / str(s)} is damaged ({err}); falling back "
                        "to the previous checkpoint.",
                        CheckpointWarning,
                        stacklevel=2,
                    )
        raise CheckpointError(
            f"no good checkpoint in {self.directory}: " + "; ".join(problems) + ". Nothing was "
            "overwritten; move the workdir away to start afresh, or restore the checkpoints "
            "from a backup."
        )

    def _restore_one(self, step: int, target: PyTree) -> Restored:
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as err:  # noqa: BLE001 - any unreadable file means a damaged checkpoint
            raise _Damaged(f"metadata unreadable: {_first_line(err)}") from err
        if not isinstance(meta, dict) or "signature" not in meta:
            raise _Damaged("metadata incomplete")
        if META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):  # (older: no digest)
            raise _Damaged("metadata differs from its saved digest")
        expected = signature(target)
        if meta["signature"] != expected:
            saved = {tuple(map(str, leaf)) for leaf in meta["signature"]}
            wanted = {tuple(map(str, leaf)) for leaf in expected}
            diff = [f"saved {' '.join(a)}" for a in sorted(saved - wanted)]
            diff += [f"expected {' '.join(a)}" for a in sorted(wanted - saved)]
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} holds another model's state "
                f"({'; '.join(diff[:4])}). Evaluate or resume it with the "
                "config it was saved with."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            ).state
        except Exception as err:  # noqa: BLE001
            raise _Damaged(f"arrays unreadable: {_first_line(err)}") from err
        if digest(state) != meta["digest"]:
            raise _Damaged("array bytes differ from the saved digest")
        return Restored(step, state, meta)

    def set_aside_after(self, step: int) -> list[int]:
        """Moves checkpoints later than `step` (damaged ones that a restore skipped) to
        `checkpoints.corrupt/`, so that training can save those steps again."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            dest = self.directory.with_name(CORRUPT_DIR) / str(s)
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(exist_ok=True)
            shutil.move(self.directory / str(s), dest)
        if later:
            self._manager.reload()
        return later

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Drops the errors `logger` logs in the block: orbax logs a failed write's traceback from
    each of its threads before raising it."""

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


class _Damaged(Exception):
    """A checkpoint that cannot be read back as saved."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"

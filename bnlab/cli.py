"""`bnlab` command line: parse, validate early, call the library.

The command answers before JAX loads: `--help`, argument errors and config errors (the experiment
file, its overrides, their validation) import nothing heavier than `bnlab.config`; JAX, Flax
and orbax load once the input is valid (`_runtime`). Exit statuses: `EXIT_STATUSES`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from bnlab.schema import OVERRIDE_PREFIX, ConfigError, split_overrides  # noqa: F401

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
EXIT_LOST_PROCESS = 5  # == bnlab.training.parallel.EXIT_LOST_PROCESS
# Every exit status of the command and its meaning: the help, docs/cli.md and README's table.
EXIT_STATUSES = {
    EXIT_OK: "done (also when early stopping ended the run)",
    EXIT_FAILED: "some sweep trials failed (rerun to retry them)",
    EXIT_BAD_INPUT: "bad input or a checkpoint error (the message says how to fix it)",
    EXIT_DIVERGED: "diverged",
    EXIT_INTERRUPTED: "stopped by SIGTERM/SIGINT (run the same command to resume)",
    EXIT_LOST_PROCESS: "a multi-process run lost one of its processes (start them all again to "
    "resume)",
}
EXIT_CODES = "exit status: " + ", ".join(f"{k} {v}" for k, v in EXIT_STATUSES.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch normalization research on MNIST with JAX/Flax.",
        epilog=EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train one model from an experiment file",
        description="Train one model. Override any config field with --config.GROUP.FIELD=VALUE "
        "(e.g. --config.model.norm=none --config.train.epochs=1). Checkpoints go to "
        "WORKDIR/checkpoints (--config.checkpoint.every_steps, --config.checkpoint.keep); the "
        "same command in the same workdir resumes an unfinished run.",
        epilog=EXIT_CODES,
    )
    train.add_argument("--config", required=True, help="experiment file defining get_config()")
    train.add_argument(
        "--workdir",
        required=True,
        help="output folder (created; an unfinished run in it is resumed; a finished one is "
        "never overwritten)",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--smoke", action="store_true", help="apply the experiment's SMOKE overrides (quick check)"
    )
    sweep = sub.add_parser(
        "sweep",
        help="run every trial of an experiment's sweep() (finished trials are skipped)",
        description="Run the trials of an experiment's sweep() into WORKDIR/runs/<trial_id>/. "
        "Run it again to resume: finished trials are skipped. --config.GROUP.FIELD=VALUE "
        "overrides every trial.",
    )
    sweep.add_argument("experiment", help="experiment file defining get_config() and sweep()")
    sweep.add_argument("--workdir", required=True, help="sweep folder (shared by all shards)")
    sweep.add_argument("--smoke", action="store_true", help="the small variant of every trial")
    sweep.add_argument("--shard", default="0/1", help="i/N: run only shard i of N (default 0/1)")
    sweep.add_argument(
        "--engine",
        choices=("vmap", "sequential"),
        default="vmap",
        help="vmap (default): trials differing only in seed and numeric optimizer "
        "hyperparameters train together in one compiled program; sequential: one by one",
    )
    sweep.add_argument(
        "--chunk",
        type=_positive_int,
        default=None,
        help="at most this many trials per compiled program (default: as many as fit memory)",
    )
    report = sub.add_parser(
        "report",
        help="write DIR/report.md and DIR/figures/*.png for a sweep folder",
        description="Summarise a sweep folder (the --workdir of `bnlab sweep`): statistics over "
        "seeds per setting and figures, in DIR/report.md. Unfinished trials are listed as missing.",
    )
    report.add_argument(
        "dir", help="sweep folder holding sweep.json and runs/, or a study folder (study.json)"
    )
    report.add_argument(
        "--data",
        metavar="OUT",
        help="also write the sweep's compact data to OUT/study.json (with selection.json) and "
        "build the report there, from it alone: the folder to commit (e.g. docs/studies/NAME)",
    )
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a run's latest good checkpoint on the test split",
        description="Evaluate the latest good checkpoint of WORKDIR (or --step) on the test split, "
        "from any folder. MNIST is read from --mnist-dir, else $BNLAB_MNIST_DIR, else the "
        "folders the run trained from (config.json names them); --config.data.mnist_dir and "
        "--config.data.tfds_dir are the same as the flags.",
    )
    evaluate.add_argument("workdir", help="a training workdir (with checkpoints/)")
    evaluate.add_argument("--step", type=int, help="this checkpoint instead of the latest")
    evaluate.add_argument(
        "--recalibrate",
        type=_positive_int,
        default=0,
        metavar="N",
        help="also evaluate with BN's running statistics re-estimated from the first N "
        "training examples (both results in WORKDIR/evaluate.json)",
    )
    evaluate.add_argument(
        "--mnist-dir", metavar="DIR", help="folder with the four MNIST IDX files (*-ubyte.gz)"
    )
    evaluate.add_argument(
        "--tfds-dir", metavar="DIR", help="TFDS data dir to prepare or read MNIST in"
    )
    export = sub.add_parser(
        "export",
        help="write a checkpoint's params and batch_stats as .npz or a PyTorch state_dict",
        description="Export the latest good checkpoint of WORKDIR (or --step): npz in bnlab's "
        "layout, or a PyTorch state_dict (BN running statistics as running_mean/running_var).",
    )
    export.add_argument("workdir", help="a training workdir (with checkpoints/)")
    export.add_argument("--format", required=True, choices=("npz", "torch"))
    export.add_argument(
        "--out",
        help="output file, or a folder for export.npz/export.pt (missing folders are created; "
        "default: WORKDIR/export.npz or export.pt)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.add_argument("--step", type=int, help="this checkpoint instead of the latest")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from bnlab import config

    module = config.load_module(args.config)
    if args.smoke:
        _note(config.smoke_note(module, args.config))
    smoke = config.smoke_overrides(module) if args.smoke else {}
    raw = config.apply_overrides(config.config_of(module, args.config), {**smoke, **overrides})
    cfg = config.validate(raw)
    with _runtime(args.command):
        from bnlab.training.records import result_line
        from bnlab.training.run import run

        try:
            summary = run(cfg, args.workdir, progress=not args.no_progress, experiment=args.config)
        except KeyboardInterrupt as err:
            if not getattr(err, "finished", False):
                raise
            summary = json.loads((Path(args.workdir) / "summary.json").read_text())
            _note(
                f"{signal.Signals(err.signum).name} arrived as the last steps ran: the run "
                "finished (summary.json is written); there is nothing to resume."
            )
    print(result_line(summary, args.workdir))
    # Early stopping is a normal end; only divergence is a failure of the run.
    return EXIT_DIVERGED if summary["status"] == "diverged" else EXIT_OK


def cmd_sweep(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from bnlab.studies import sweep

    shard_spec = sweep.parse_shard(args.shard)
    module = sweep.load_experiment(args.experiment)
    if args.smoke:
        for note in sweep.smoke_notes(module, args.experiment):
            _note(note)
    sweep.trial_configs(module, smoke=args.smoke, overrides=overrides)  # bad input fails here
    with _runtime(args.command):
        counts = sweep.run_sweep(
            args.experiment,
            args.workdir,
            smoke=args.smoke,
            shard_spec=shard_spec,
            overrides=overrides,
            engine=args.engine,
            max_chunk=args.chunk,
        )
    done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep done: {done or f'nothing to run in shard {args.shard}'}")
    if counts.get("failed"):
        print(
            f"bnlab: {counts['failed']} trial(s) failed; their summary.json holds the error. "
            "Fix it and run the same command again: failed trials are retried.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def cmd_report(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if overrides:
        raise ConfigError("bnlab report takes no --config.* overrides; pass only the sweep folder.")
    from bnlab.studies.report import write_report

    print(write_report(args.dir, args.data))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from bnlab.schema import parse_value

    folders = {}
    for key in ("mnist_dir", "tfds_dir"):  # resumable fields: --config.data.* names the flags
        value = parse_value(overrides.pop(f"data.{key}", "None"))
        folders[key] = getattr(args, key) or (None if value is None else str(value))
    _no_overrides(overrides)
    with _runtime(args.command):
        from bnlab.training.run import evaluate

        result = evaluate(args.workdir, step=args.step, recalibrate=args.recalibrate, **folders)
    line = f"step={result['step']} test_accuracy={result['accuracy']:.4f} "
    line += f"test_loss={result['loss']:.4f} "
    if "recalibrated" in result:
        r = result["recalibrated"]
        line += f"recalibrated({r['examples']}): test_accuracy={r['accuracy']:.4f} "
        line += f"test_loss={r['loss']:.4f} "
    print(line + f"workdir={args.workdir}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    _no_overrides(overrides)
    with _runtime(args.command):
        from bnlab.export import export

        path = export(args.workdir, args.format, args.out, step=args.step, force=args.force)
    print(f"wrote {path}")
    return EXIT_OK


def _no_overrides(overrides: dict[str, str]) -> None:
    if overrides:
        raise ConfigError(
            f"--config.* overrides ({', '.join(overrides)}) apply to train and sweep only; "
            "a checkpoint is used with the config it was trained with (evaluate reads MNIST from "
            "another folder with --mnist-dir or --tfds-dir)."
        )


def _note(text: str | None) -> None:
    if text:
        print(f"bnlab: {text}", file=sys.stderr, flush=True)


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
}
COUNT_COMPILES_ENV = "BNLAB_COUNT_COMPILES"  # "1": print the programs a command compiled
WRITING_EVENTS = ("train", "sweep")  # commands that write TensorBoard events
TRAINING = ("train", "sweep")  # commands whose SIGINT/SIGTERM stop training loops cleanly


@contextlib.contextmanager
def _runtime(command: str) -> Iterator[None]:
    """What a command starts once its input is valid, before anything compiles: JAX's
    persistent compilation cache (`bnlab.training.compile_cache`), TensorBoard's writer and,
    with `$BNLAB_COUNT_COMPILES` set, a report of the programs compiled meanwhile."""
    from bnlab.training import compile_cache

    compile_cache.enable()
    if command in WRITING_EVENTS:
        from bnlab.training.writers import summary_writer_class

        # Now, while this process has one thread: it hides torch for a moment.
        summary_writer_class()
    counting = os.environ.get(COUNT_COMPILES_ENV, "") not in ("", "0")
    start = compile_cache.counts() if counting else None
    try:
        with contextlib.ExitStack() as stack:
            if command in TRAINING:
                from bnlab.training.loop import StopSignals

                # Held for the whole command: a signal outside a training loop (loading data,
                # compiling, between trials) is a request that the next loop acts on before
                # its first step, not a KeyboardInterrupt raised under XLA (exit 139) or
                # inside a garbage collector's callback (where Python ignores it).
                stack.enter_context(StopSignals())
            yield
    finally:
        if start is not None:
            report = (compile_cache.counts() - start).describe()
            print(f"bnlab: {report}", file=sys.stderr, flush=True)


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """`module.name` if that module is loaded: an exception of a module that never loaded was
    not raised, and looking for it must not load JAX."""
    return (getattr(sys.modules[module], name),) if module in sys.modules else ()


def _user_errors() -> tuple[type[BaseException], ...]:
    return (
        ConfigError,
        *_loaded("bnlab.data.idx", "DataError"),
        *_loaded("bnlab.training.checkpoint", "CheckpointError"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None  # the bnlab command itself, not a call from Python
    code = _main(sys.argv[1:] if argv is None else argv, from_command_line)
    if from_command_line and "jax" in sys.modules:
        _leave(code)
    return code


def _main(argv: Sequence[str], from_command_line: bool) -> int:
    try:
        rest, overrides = split_overrides(argv)
        args = _parser().parse_args(rest)
        return COMMANDS[args.command](args, overrides)
    except _user_errors() as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _loaded("bnlab.training.parallel", "LostProcess") as err:
        print(f"bnlab: error: {err}", file=sys.stderr, flush=True)
        if from_command_line:  # JAX's exit handler would wait for the lost process, then abort
            sys.stdout.flush()
            sys.modules["bnlab.training.parallel"].coordinator_leaves_last()
            os._exit(EXIT_LOST_PROCESS)
        return EXIT_LOST_PROCESS
    except KeyboardInterrupt as err:
        interrupted = _loaded("bnlab.training.loop", "Interrupted")
        abandoned = _loaded("bnlab.training.loop", "Abandoned")
        if isinstance(err, interrupted):
            saved = "after saving a checkpoint" if err.saved else "before training went on"
            print(f"bnlab: {err}, {saved}; run the same command to resume.", file=sys.stderr)
        elif isinstance(err, abandoned):
            print(f"bnlab: {err}. Run the same command to resume.", file=sys.stderr, flush=True)
            if from_command_line:
                sys.stdout.flush()
                # The abandoned chunk may still run in its worker thread: leave without waiting.
                os._exit(EXIT_INTERRUPTED)
        else:  # outside a training loop (loading, compiling, between trials): nothing to save
            print(
                "bnlab: interrupted outside training; every finished result and checkpoint is "
                "kept. Run the same command to continue.",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


def _leave(code: int) -> NoReturn:
    """Ends the `bnlab` process as interpreter shutdown would where it matters (the other
    threads finish, the exit handlers run: JAX's, logging's), without then tearing down its
    ~1,400 modules one by one: 0.3-0.7 s after a training run (BENCHMARKS.md)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe (`bnlab ... | head`)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

"""The time a user waits: programs compiled once (and not at all on a second run), one program
for every chunk length, and no import a command does not need. Speed itself is measured by
benchmarks/wall_time.py, not asserted here."""

import functools
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnlab import data
from bnlab.training import compile_cache, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = "experiments/bn_paper_mlp.py"
CNN = "experiments/mnist_cnn.py"
COUNTS = re.compile(r"bnlab: (\d+) programs: (\d+) compiled, (\d+) read from the compilation cache")


def _programs(make_config, **overrides):
    cfg = make_config(MLP, **{"data.train_size": 600, **overrides})  # 10 steps of 60
    ds = data.load(cfg.data, "train")
    programs = train.make_programs(cfg, ds.size)
    state = programs.init(train.run_keys(0)[0], data.to_float(ds.images[:60]))
    return cfg, ds, programs, state


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # train_epoch donates its state


def test_chunks_of_every_length_run_one_program_and_equal_the_whole_epoch(make_config):
    cfg, ds, programs, state = _programs(make_config, **{"checkpoint.every_steps": 4})
    assert train.chunk_length(cfg, programs.steps_per_epoch) == 4
    key = jax.random.key(3)
    before = compile_cache.counts()
    chunked, parts = _copy(state), []
    for start, steps in [(0, 4), (4, 4), (8, 2)]:  # the epoch's remainder is 2 steps
        chunked, metrics = programs.train_epoch(
            chunked, ds.images, ds.labels, key, start, steps=steps, rng=jax.random.key(1)
        )
        assert metrics["loss"].shape == (steps,)
        parts.append(metrics)
    compiled = (compile_cache.counts() - before).names
    assert compiled.count("jit(train_epoch)") == 1, compiled
    # The whole epoch in one call (a program with a 10-step buffer) gives the same bits.
    _, _, whole_programs, _ = _programs(make_config, **{"checkpoint.every_steps": 0})
    whole, metrics = whole_programs.train_epoch(
        _copy(state), ds.images, ds.labels, key, rng=jax.random.key(1)
    )
    for name in metrics:
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), metrics[name])
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)


def test_programs_compiled_ahead_are_not_compiled_again(make_config):
    cfg, ds, programs, state = _programs(make_config, **{"checkpoint.every_steps": 4})
    test = data.load(cfg.data, "test")
    key, rng = train.run_keys(0)[1], train.run_rng(0)
    before = compile_cache.counts()
    programs.compile_ahead(state, ds, test, key, rng)
    state, _ = programs.train_epoch(state, ds.images, ds.labels, key, 0, steps=4, rng=rng)
    state, _ = programs.train_epoch(state, ds.images, ds.labels, key, 4, steps=4, rng=rng)
    programs.evaluate(state.params, state.batch_stats, test.images, test.labels)
    names = (compile_cache.counts() - before).names
    assert names.count("jit(train_epoch)") == 1 and names.count("jit(evaluate)") == 1, names


def test_one_compiled_chunk_equals_a_scan_over_the_steps(make_config):
    """The while loop with a traced trip count gives the bits of a plain `lax.scan` of
    `train_step` over the same batches (how epochs ran before chunks shared a program)."""
    cfg, ds, programs, state = _programs(make_config)
    key, rng = jax.random.key(5), train.run_rng(0)
    step = functools.partial(
        train.train_step, model=programs.model, tx=programs.tx, schedule=programs.schedule
    )

    @jax.jit
    def scanned(state, images, labels, key):
        batches = train.epoch_batches(key, labels.shape[0], cfg.train.batch_size)[2:9]
        return jax.lax.scan(
            lambda s, i: step(s, (data.to_float(images[i]), labels[i]), rng=rng), state, batches
        )

    want = scanned(_copy(state), ds.images, ds.labels, key)
    got = programs.train_epoch(_copy(state), ds.images, ds.labels, key, 2, steps=7, rng=rng)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_global_norm_equals_optax_and_reduces_small_leaves_together():
    shapes = [(784, 100), (100,), (100, 100), (3, 3, 1, 32), (32,), (10,), (), (128, 129)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    leaves = [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]
    tree = {str(i): x for i, x in enumerate(leaves)}
    want = float(optax.tree.norm(tree))
    np.testing.assert_allclose(float(jax.jit(train.global_norm)(tree)), want, rtol=1e-6)
    assert float(train.global_norm({})) == 0.0
    # One concatenation of the small leaves; each large one is reduced alone.
    hlo = jax.jit(train.global_norm).lower(tree).as_text()
    assert hlo.count("stablehlo.concatenate") == 1
    assert sum(int(np.prod(s)) < train.SMALL_LEAF for s in shapes) == 6


@pytest.mark.parametrize("experiment", [MLP, CNN])
def test_initialization_compiled_for_one_run_gives_the_default_bits(make_config, experiment):
    cfg = make_config(experiment, **{"data.train_size": 600})
    programs = train.make_programs(cfg, 600)
    sample = jnp.zeros((cfg.train.batch_size, 28, 28, 1), jnp.float32)
    default = jax.jit(functools.partial(train.init_state, programs.model, programs.tx))
    for seed in (0, 1):
        key = train.run_keys(seed)[0]
        jax.tree.map(
            np.testing.assert_array_equal, programs.init(key, sample), default(key, sample)
        )


def test_compilation_cache_folder_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "bnlab" / "jax"
    monkeypatch.setenv(compile_cache.CACHE_ENV, "off")
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir != str(tmp_path / "xdg" / "bnlab" / "jax")
    session = jax.config.jax_compilation_cache_dir  # conftest's cache for the whole session
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "mine"))
    try:
        assert compile_cache.enable() == tmp_path / "mine"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    finally:
        compile_cache.enable(session)


def test_an_unwritable_compilation_cache_is_one_line_and_no_warnings(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")  # a folder cannot be made under it, whoever runs the test
    session = jax.config.jax_compilation_cache_dir
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert compile_cache.enable(a_file / "cache") is None
            for k in range(3):  # programs JAX would have tried to read and store
                jax.jit(lambda x, k=k: x * k + 1.5)(jnp.ones(3)).block_until_ready()
        assert [str(w.message) for w in caught] == []
        err = capsys.readouterr().err
        assert err.startswith(f"bnlab: the compilation cache {a_file / 'cache'} cannot be written")
        assert err.count("\n") == 1 and "$BNLAB_COMPILATION_CACHE" in err
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        compile_cache.enable(session)
    assert jax.config.jax_compilation_cache_dir == session


# Whole commands, each in its own process as a user runs them.

_RUN = """
import json, sys
from bnlab import cli
rc = cli.main(sys.argv[1:])
heavy = ("torch", "matplotlib", "tensorflow_datasets", "tensorboardX", "orbax.checkpoint")
print("MODULES " + json.dumps([m for m in heavy if m in sys.modules]))
sys.exit(rc)
"""


def _command(args, cache, tmp_path):
    # The command's own cache set-up, not the test session's (conftest sets JAX_* variables).
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        {compile_cache.CACHE_ENV: str(cache), "BNLAB_COUNT_COMPILES": "1", "PYTHONPATH": ROOT}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [m for m in COUNTS.finditer(proc.stderr)]
    programs, compiled, cached = (int(g) for g in line.groups())
    modules = json.loads(proc.stdout.split("MODULES ", 1)[1])
    return programs, compiled, cached, modules, proc.stderr


@pytest.mark.slow
def test_second_run_compiles_nothing_and_commands_import_only_what_they_use(tfds_dir, tmp_path):
    cache = tmp_path / "jax-cache"
    train_args = [
        "train",
        "--config",
        MLP,
        "--smoke",  # 1,200 examples: 20 steps of 60
        "--config.checkpoint.every_steps=7",  # chunks of 7, 7 and 6 steps: one program
        f"--config.data.tfds_dir={tfds_dir}",
        "--no-progress",
    ]
    first = _command([*train_args, "--workdir", str(tmp_path / "a")], cache, tmp_path)
    programs, compiled, cached, modules, stderr = first
    assert compiled == programs and cached == 0
    names = re.search(r"lowering \((.*)\)", stderr).group(1)
    for program in ("jit(init_state)", "jit(train_epoch)", "jit(evaluate)"):
        assert f"{program}," in f"{names}," and f"{program} x" not in names, names
    # Events are written (tensorboardX) and checkpoints saved (orbax); PyTorch, TFDS (the array
    # copy is read) and matplotlib are not loaded.
    assert modules == ["tensorboardX", "orbax.checkpoint"], modules
    second = _command([*train_args, "--workdir", str(tmp_path / "b")], cache, tmp_path)
    assert second[:3] == (programs, 0, programs)  # every program read from the cache
    evaluate = _command(["evaluate", str(tmp_path / "a")], cache, tmp_path)
    assert evaluate[3] == ["orbax.checkpoint"]


@pytest.mark.slow
def test_tensorboardx_loads_without_torch_and_torch_still_loads_after():
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from bnlab.training.writers import summary_writer_class\n"
        "summary_writer_class()\n"
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules\n"
        "import torch\n"
        "print(torch.ones(2).sum().item())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2.0"

"""Data parallelism on 8 CPU devices: sync BN equals the global batch, pmap and sharded training
equal one device, local BN equals ghost BN, masks, clear split errors, and 2 processes."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT

from bnlab import config, data, norm
from bnlab.training import parallel, train

MODES = ("pmap", "sharded")
MLP = "experiments/bn_paper_mlp.py"
CNN = "experiments/mnist_cnn.py"


def _close(a, b, rtol=1e-4, atol=1e-5):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol), a, b
    )


def _normal(seed, shape, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).normal(loc, scale, shape)).astype(np.float32)


def _bn_forward_and_grads(x, ct, mask, stats, scale, bias, *, backward, axis_name):
    """`(y, new_stats)` and the gradients of `sum(y * ct)` w.r.t. `x`, `scale`, `bias`."""

    def loss(x, scale, bias):
        y, new = norm.batch_norm(
            x,
            stats,
            scale,
            bias,
            training=True,
            axis=1,
            momentum=0.5,
            axis_name=axis_name,
            backward=backward,
            mask=mask,
        )
        return jnp.sum(y * ct), (y, new)

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return out, grads


def _on_devices(mode, backward, x, ct, mask, stats, scale, bias):
    """The per-device BN of `x[d]` on device d, with statistics synced over all 8 devices."""
    fn = functools.partial(_bn_forward_and_grads, backward=backward, axis_name=parallel.AXIS)
    mapped = parallel.device_map(
        lambda x, ct, mask: fn(x, ct, mask, stats, scale, bias),
        mode=mode,
        num_devices=8,
        split_argnums=(0, 1, 2),
    )
    return mapped(x, ct, mask)


@pytest.mark.parametrize("backward", norm.BACKWARDS)
def test_sync_bn_on_8_devices_equals_global_batch_in_both_modes(backward):
    shape = (32, 3, 2)  # B=32, statistics over the batch and the last axis
    x, ct = _normal(1, shape, loc=2.0, scale=3.0), _normal(2, shape)
    stats = {"mean": _normal(3, (3,)), "var": 1.0 + _normal(4, (3,)) ** 2}
    scale, bias = _normal(5, (3,)), _normal(6, (3,))
    (y, new), (dx, dscale, dbias) = jax.jit(
        functools.partial(_bn_forward_and_grads, backward="autodiff", axis_name=None)
    )(x, ct, None, stats, scale, bias)
    results = {}
    for mode in MODES:
        split = lambda a: a.reshape((8, 4) + a.shape[1:])  # noqa: E731
        ones = np.ones((8, 4), np.float32)
        (y_d, new_d), (dx_d, dscale_d, dbias_d) = _on_devices(
            mode, backward, split(x), split(ct), ones, stats, scale, bias
        )
        _close(np.asarray(y_d).reshape(shape), y, atol=1e-5)
        _close(new_d, jax.tree.map(lambda s: np.broadcast_to(s, (8, 3)), new))
        _close(np.asarray(dx_d).reshape(shape), dx)
        # Each device differentiates its own loss: the global gradient is their sum.
        _close((dscale_d.sum(0), dbias_d.sum(0)), (dscale, dbias))
        results[mode] = (y_d, new_d, dx_d, dscale_d, dbias_d)
    _close(results["pmap"], results["sharded"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", norm.BACKWARDS)
def test_masked_sync_with_unequal_device_batches_equals_unpadded_global_batch(mode, backward):
    per_device, features = 6, 3
    valid = np.arange(8) % per_device + 1  # 1..6 real examples on each device, rest padding
    mask = (np.arange(per_device)[None] < valid[:, None]).astype(np.float32)
    x = _normal(7, (8, per_device, features, 2), loc=-1.0, scale=2.0)
    x[mask == 0] = 1e3  # padding values must not leak into the statistics
    ct = _normal(8, x.shape) * mask[..., None, None]  # the loss sees only real examples
    stats = norm.init_stats(features)
    scale, bias = _normal(9, (features,)), _normal(10, (features,))
    (y_d, new_d), (dx_d, dscale_d, dbias_d) = _on_devices(
        mode, backward, x, ct, mask, stats, scale, bias
    )
    real = mask > 0
    (y, new), (dx, dscale, dbias) = jax.jit(
        functools.partial(_bn_forward_and_grads, backward="autodiff", axis_name=None)
    )(x[real], ct[real], None, stats, scale, bias)
    _close(np.asarray(y_d)[real], y)
    _close(new_d, jax.tree.map(lambda s: np.broadcast_to(s, (8, features)), new))
    _close(np.asarray(dx_d)[real], dx)
    _close((dscale_d.sum(0), dbias_d.sum(0)), (dscale, dbias))


def _cfg(make_config, path, mode, **overrides):
    return make_config(path, **{"parallel.mode": mode, **overrides})


def _train(cfg, epochs=2, steps=None):
    """`epochs` epochs (or `steps` steps of the first) from the seed's initial state."""
    ds = data.load(cfg.data, "train")
    programs = train.make_programs(cfg, ds.size)
    init_key, data_key = train.run_keys(cfg.train.seed)
    state = programs.init(init_key, data.to_float(ds.images[: cfg.train.batch_size]))
    metrics = []
    for epoch in range(epochs):
        key = jax.random.fold_in(data_key, epoch)
        state, m = programs.train_epoch(state, ds.images, ds.labels, key, 0, steps=steps)
        metrics.append(m)
    return state, metrics, programs, ds, data_key


def test_cnn_two_epochs_on_8_devices_equal_one_device(make_config):
    """pmap and sharded, 8 devices x 8 examples, against the same global batches of 64."""
    small = {"data.train_size": 512, "train.batch_size": 64}
    reference, ref_metrics, *_ = _train(_cfg(make_config, CNN, "none", **small))
    states = {}
    for mode in MODES:
        state, metrics, *_ = _train(_cfg(make_config, CNN, mode, **small))
        assert int(state.step) == int(reference.step) == 16
        assert state.params["head"]["kernel"].sharding.num_devices == 1  # a plain state
        _close(state.params, reference.params, rtol=1e-4, atol=2e-5)
        _close(state.batch_stats, reference.batch_stats, rtol=1e-4, atol=2e-5)
        _close(metrics, ref_metrics, rtol=1e-4, atol=1e-5)
        states[mode] = state
    _close(states["pmap"], states["sharded"], rtol=1e-6, atol=1e-7)


def _ghost_step(cfg_none, programs, state, images, labels, groups):
    """One optimizer step with plain BN on each of `groups` equal parts of the batch (ghost BN):
    the loss is the mean of the parts' losses, the new statistics the mean of theirs."""
    model = train.build_model(cfg_none)
    parts_x, parts_y = (a.reshape((groups, -1) + a.shape[1:]) for a in (images, labels))

    def loss_fn(params):
        def part(x, y):
            logits, upd = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return train.cross_entropy(logits, y), upd["batch_stats"]

        losses, stats = jax.vmap(part)(parts_x, parts_y)
        return losses.mean(), jax.tree.map(lambda s: s.mean(0), stats)

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, _ = programs.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), stats


@pytest.mark.parametrize(
    "mode, group_size", [("pmap", 1), ("sharded", 1), ("pmap", 2), ("sharded", 4)]
)
def test_local_bn_equals_ghost_bn_over_device_groups(make_config, mode, group_size):
    small = {"data.train_size": 480, "train.batch_size": 48, "norm.momentum": 0.5}
    local = _cfg(
        make_config, MLP, mode, **small, **{"parallel.bn": "local"},
        **{"parallel.bn_group_size": group_size},
    )  # fmt: skip
    state, _, programs, ds, data_key = _train(local, epochs=1, steps=1)
    cfg_none = _cfg(make_config, MLP, "none", **small)
    init_key, _ = train.run_keys(cfg_none.train.seed)
    init = programs.init(init_key, data.to_float(ds.images[:48]))
    idx = train.epoch_batches(jax.random.fold_in(data_key, 0), ds.size, 48)[0]
    params, stats = _ghost_step(
        cfg_none, programs, init, data.to_float(ds.images[idx]), ds.labels[idx], 8 // group_size
    )
    _close(state.params, params, rtol=1e-4, atol=1e-6)
    _close(state.batch_stats, stats, rtol=1e-5, atol=1e-6)
    if group_size == 1:  # and ghost statistics really differ from synced ones
        sync, *_ = _train(_cfg(make_config, MLP, mode, **small), epochs=1, steps=1)
        var = state.batch_stats["block0"]["norm"]["var"]
        assert not np.allclose(var, sync.batch_stats["block0"]["norm"]["var"], rtol=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel.num_devices": 3}, "does not split evenly over 3 devices; use a multiple"),
        ({"parallel.num_devices": 16, "train.batch_size": 8}, "exceeds train.batch_size=8"),
        (
            {"parallel.bn": "local", "parallel.bn_group_size": 3, "parallel.num_devices": 8},
            "bn_group_size=3 does not divide",
        ),
        ({"parallel.num_processes": 2}, "needs parallel.coordinator_address"),
        ({"parallel.mode": "pmap", "parallel.num_processes": 2}, "needs parallel.mode='sharded'"),
        ({"parallel.mode": "gpipe"}, "parallel.mode='gpipe' is not one of"),
    ],
)
def test_bad_device_splits_fail_at_validation(overrides, message):
    overrides = {"parallel.mode": "sharded", "train.batch_size": 64, **overrides}
    raw = config.apply_overrides(config.default_config(), {k: str(v) for k, v in overrides.items()})
    with pytest.raises(config.ConfigError, match=message):
        config.validate(raw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.batch_size": 12}, r"batch_size=12 does not split evenly over 8 devices"),
        ({"parallel.num_devices": 16, "train.batch_size": 64}, "only 8 devices are visible"),
    ],
)
def test_bad_device_splits_fail_before_compiling(make_config, overrides, message):
    cfg = _cfg(make_config, MLP, "pmap", **{"data.train_size": 640, **overrides})
    with pytest.raises(config.ConfigError, match=message):
        train.make_programs(cfg, 640)


def test_multi_host_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(config.COORDINATOR_ENV, "localhost:1234")
    monkeypatch.setenv(config.NUM_PROCESSES_ENV, "2")
    monkeypatch.setenv(config.PROCESS_ID_ENV, "1")
    raw = config.apply_overrides(config.default_config(), {"parallel.mode": "sharded"})
    par = config.validate(raw).parallel
    assert (par.coordinator_address, par.num_processes, par.process_id) == ("localhost:1234", 2, 1)
    monkeypatch.setenv(config.PROCESS_ID_ENV, "one")
    with pytest.raises(config.ConfigError, match="BNLAB_PROCESS_ID='one' must be an integer"):
        config.validate(raw)


# Run by each process of the multi-host test: 2 CPU devices per process, 2 epochs, params saved.
_WORKER = """
import sys, jax, numpy as np
from bnlab import config, data
from bnlab.training import parallel, train
out, overrides = sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
cfg = config.validate(config.apply_overrides(config.load_config(sys.argv[1]), overrides))
parallel.initialize(cfg.parallel)
ds = data.load(cfg.data, "train")
programs = train.make_programs(cfg, ds.size)
init_key, data_key = train.run_keys(cfg.train.seed)
state = programs.init(init_key, data.to_float(ds.images[: cfg.train.batch_size]))
for epoch in range(2):
    key = jax.random.fold_in(data_key, epoch)
    state, _ = programs.train_epoch(state, ds.images, ds.labels, key)
leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
np.savez(out, *leaves, devices=jax.device_count(), processes=jax.process_count())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes
def test_two_processes_equal_one_process(make_config, tfds_dir, tmp_path):
    small = {"data.train_size": 480, "train.batch_size": 48, "parallel.bn": "sync"}
    reference, *_ = _train(
        _cfg(make_config, MLP, "sharded", **small, **{"parallel.num_devices": 4})
    )
    expected = jax.tree.leaves(jax.device_get((reference.params, reference.batch_stats)))
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
        config.COORDINATOR_ENV: f"localhost:{port}",
        config.NUM_PROCESSES_ENV: "2",
    }
    args = [f"{k}={v}" for k, v in small.items()] + [
        "parallel.mode=sharded",
        f"data.tfds_dir={tfds_dir}",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, MLP, str(tmp_path / f"p{i}.npz"), *args],
            cwd=ROOT,
            env={**env, config.PROCESS_ID_ENV: str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        saved = np.load(tmp_path / f"p{i}.npz")
        assert int(saved["devices"]) == 4 and int(saved["processes"]) == 2
        leaves = [saved[f"arr_{j}"] for j in range(len(expected))]
        _close(leaves, expected, rtol=1e-5, atol=1e-6)


def test_cli_trains_with_pmap(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "bnlab.cli", "train",
            "--config", MLP,
            "--workdir", str(workdir),
            "--config.parallel.mode=pmap",
            "--config.data.train_size=480",
            "--config.train.batch_size=48",
            "--config.train.epochs=1",
            f"--config.data.tfds_dir={tfds_dir}",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 10
    assert json.loads((workdir / "config.json").read_text())["parallel"]["mode"] == "pmap"

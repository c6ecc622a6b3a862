"""The normalization registry end to end: every variant trains alone, vmapped, on 8 devices,
resumes, evaluates and exports; bad configs fail early; an experiment file adds its own."""

import dataclasses
import functools
import importlib.util
import json
import re
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from test_batched import BATCH, _assert_same_records
from test_checkpoint import _assert_same_run

from bnlab import cli, config, data, diagnostics, export, norms, schema
from bnlab import norm as norm_lib
from bnlab.training import batched, run, train

VARIANTS = (
    "batchnorm_noaffine",
    "ghost_batchnorm",
    "batch_renorm",
    "noisy_batchnorm",
    "population_batchnorm",
    "population_batchnorm_data",
    "batchnorm_stopgrad",
    "layernorm",
    "groupnorm",
    "weightnorm",
    "ws_groupnorm",
)
# The variants PyTorch has (BN's values without its gradient evaluate as BN).
TORCH = {"layernorm", "groupnorm", "batchnorm_noaffine", "batchnorm_stopgrad"}
# The ReLU MLP at batch 60 on 240 examples: 4 steps per epoch, records every 2 steps. Fields
# chosen so that every variant does something: 3 virtual batches, 10 groups of 10 units, the
# renorm schedule relaxing within the run.
SMALL = {
    "model.name": "mlp",
    "model.activation": "relu",
    "model.init": "he_normal",
    "opt.name": "momentum",
    "train.batch_size": BATCH,
    "data.train_size": 4 * BATCH,
    "train.epochs": 1,
    "train.log_every_steps": 2,
    "norm.virtual_batch_size": 20,
    "norm.num_groups": 10,
    "norm.renorm_warmup_steps": 1,
    "norm.r_max_steps": 2,
    "norm.d_max_steps": 4,
    "norm.refresh_every": 3,
    "norm.refresh_examples": 2 * BATCH,
}


def _config(tfds_dir, norm, **overrides):
    overrides = {**SMALL, "model.norm": norm, "data.tfds_dir": tfds_dir, **overrides}
    return config.validate(
        config.apply_overrides(config.default_config(), {k: str(v) for k, v in overrides.items()})
    )


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, tfds_dir):
    """`get(norm, seed)`: `(cfg, workdir)` of a finished single run, trained once per module."""
    done = {}

    def get(norm, seed=0):
        if (norm, seed) not in done:
            cfg = _config(tfds_dir, norm, **{"train.seed": seed})
            workdir = tmp_path_factory.mktemp(f"{norm}-{seed}") / "run"
            run.run(cfg, workdir)
            done[norm, seed] = cfg, workdir
        return done[norm, seed]

    return get


@pytest.mark.parametrize("norm", VARIANTS)
def test_every_variant_trains_vmapped_as_alone(norm, single_runs, tmp_path):
    configs, alone = zip(*(single_runs(norm, seed) for seed in (0, 1)), strict=True)
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    summaries = batched.run_group(list(configs), dirs)
    for summary, vmapped, workdir in zip(summaries, dirs, alone, strict=True):
        assert summary["status"] == "ok" and summary["engine"] == "vmap"
        assert summary["steps"] == 4
        _assert_same_records(vmapped, workdir)


def test_renorm_logs_its_schedule_with_the_train_metrics(single_runs):
    cfg, workdir = single_runs("batch_renorm")
    records = [r for r in _records(workdir) if r["split"] == "train"]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        steps = np.arange(r["step"] - r["window"], r["step"])
        n = cfg.norm
        r_max, d_max = norm_lib.renorm_schedule(
            steps, r_max=n.r_max, d_max=n.d_max, warmup_steps=n.renorm_warmup_steps,
            r_max_steps=n.r_max_steps, d_max_steps=n.d_max_steps,
        )  # fmt: skip
        np.testing.assert_allclose([r["renorm_r_max"], r["renorm_d_max"]],
                                   [r_max.mean(), d_max.mean()], rtol=1e-6)  # fmt: skip
    assert records[-1]["renorm_d_max"] > 0  # relaxed within the run


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("norm", ["batch_renorm", "noisy_batchnorm", "population_batchnorm_data"])
def test_resume_is_bit_identical(norm, tmp_path, tfds_dir):
    """The renorm counter, the noise and the statistics' refresh steps derive from the state,
    the run's key and the step's index in its epoch: a run resumed from its checkpoint at step
    6 (mid-epoch) ends as the uninterrupted one."""
    cfg = _config(tfds_dir, norm, **{"train.epochs": 2, "checkpoint.every_steps": 2})
    reference = tmp_path / "reference"
    run.run(cfg, reference)
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    (resumed / "summary.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "8")
    assert max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == 6
    run.run(cfg, resumed)
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("norm", VARIANTS)
def test_evaluate_and_export(norm, single_runs, tmp_path, capsys):
    cfg, workdir = single_runs(norm)
    summary = json.loads((workdir / "summary.json").read_text())
    assert cli.main(["evaluate", str(workdir)]) == 0
    assert f"test_accuracy={summary['test_accuracy']:.4f}" in capsys.readouterr().out
    restored = run.load_checkpoint(workdir)[1].state
    out = tmp_path / "w.npz"
    assert cli.main(["export", str(workdir), "--format", "npz", "--out", str(out)]) == 0
    params, batch_stats, step = export.load_npz(out)
    assert step == 4
    jax.tree.map(np.testing.assert_array_equal, (params, batch_stats),
                 (restored.params, restored.batch_stats))  # fmt: skip
    code = cli.main(["export", str(workdir), "--format", "torch", "--out", str(tmp_path / "w.pt")])
    if norm not in TORCH:
        assert code == 2
        assert f"PyTorch has no layer equal to model.norm={norm!r}" in capsys.readouterr().err
        return
    if importlib.util.find_spec("torch") is None:  # CI installs no torch: the refusal names it
        assert code == 2
        assert "--format torch needs PyTorch" in capsys.readouterr().err
        pytest.skip("could not import 'torch': the exported file's parity is checked where it is")
    assert code == 0
    import torch

    tm = _torch_model(torch, norm, cfg, {"mlp": [(100,)] * 3})
    tm.load_state_dict(torch.load(tmp_path / "w.pt"), strict=True)
    images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    logits = train.build_model(cfg).apply(
        {"params": params, "batch_stats": batch_stats}, images, train=False
    )
    np.testing.assert_allclose(
        _torch_logits(torch, tm, images, "mlp"), logits, rtol=1e-4, atol=1e-5
    )


def _torch_norm(torch, norm, cfg, shape):
    """The PyTorch module of `norm` for an input of `shape` (NCHW order, batch axis dropped)."""
    nn, eps, channels = torch.nn, cfg.norm.epsilon, shape[0]
    if norm == "layernorm":
        return nn.LayerNorm(shape, eps=eps)
    if norm == "groupnorm":
        return nn.GroupNorm(min(cfg.norm.num_groups, channels), channels, eps=eps)
    bn = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    return bn(channels, eps=eps, affine=norm != "batchnorm_noaffine")


def _torch_model(torch, norm, cfg, shapes):
    """bnlab's MLP or CNN in PyTorch, with `norm` at each normalization site."""
    nn = torch.nn
    tm = nn.Module()
    if "mlp" in shapes:
        for i in range(3):
            tm.add_module(f"dense{i}", nn.Linear(784 if i == 0 else 100, 100))
    else:
        tm.add_module("conv0", nn.Conv2d(1, 32, 3, padding=1))
        tm.add_module("conv1", nn.Conv2d(32, 64, 3, padding=1))
        tm.add_module("dense", nn.Linear(7 * 7 * 64, 256))
    for i, shape in enumerate(next(iter(shapes.values()))):
        block = nn.Module()
        block.add_module("norm", _torch_norm(torch, norm, cfg, shape))
        tm.add_module(f"block{i}", block)
    tm.add_module("head", nn.Linear(100 if "mlp" in shapes else 256, 10))
    tm.eval()
    return tm


def _torch_logits(torch, tm, images, name):
    relu, pool = torch.relu, torch.nn.AvgPool2d(2)
    with torch.no_grad():
        if name == "mlp":
            x = torch.from_numpy(images.reshape(len(images), -1))
            for i in range(3):
                x = relu(getattr(tm, f"block{i}").norm(getattr(tm, f"dense{i}")(x)))
        else:
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            x = pool(relu(tm.block0.norm(tm.conv0(x))))
            x = pool(relu(tm.block1.norm(tm.conv1(x))))
            x = relu(tm.block2.norm(tm.dense(torch.flatten(x, 1))))
        return tm.head(x).numpy()


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
def test_cnn_exports_to_the_pytorch_layer(norm, tfds_dir):
    """Conv feature maps: LayerNorm's weights span (C, H, W) in PyTorch's order; 64 groups
    are clipped to the 32 channels of the first layer. (BN without affine on conv maps is BN's
    export, which tests/test_checkpoint.py covers.)"""
    torch = pytest.importorskip("torch")
    cfg = _config(tfds_dir, norm, **{"model.name": "cnn", "norm.num_groups": 64})
    model = train.build_model(cfg)
    images = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    # Random affine parameters and statistics (variances positive), so no layout hides.
    perturb = lambda v: v + jax.random.uniform(next(keys), v.shape, minval=0.1, maxval=0.5)  # noqa: E731
    params = {
        k: jax.tree.map(perturb, v) if "block" in k else v for k, v in variables["params"].items()
    }
    stats = jax.tree.map(perturb, variables.get("batch_stats", {}))
    shapes = export.norm_input_shapes(model, images[:1])
    layout = export.to_torch_layout(params, stats, step=3, cfg=cfg, shapes=shapes)
    nchw = {"cnn": [(s[-1], *s[:-1]) for k, s in sorted(shapes.items()) if k.endswith("/norm")]}
    tm = _torch_model(torch, norm, cfg, nchw)
    tm.load_state_dict({k: torch.tensor(v) for k, v in layout.items()}, strict=True)
    expected = jax.jit(functools.partial(model.apply, train=False))(
        {"params": params, "batch_stats": stats}, images
    )
    np.testing.assert_allclose(
        _torch_logits(torch, tm, images, "cnn"), expected, rtol=1e-4, atol=1e-5
    )


# --- multi-device runs ------------------------------------------------------------------------


def _train_steps(cfg, steps=3):
    ds = data.load(cfg.data, "train")
    programs = train.make_programs(cfg, ds.size)
    init_key, data_key = train.run_keys(cfg.train.seed)
    state = programs.init(init_key, data.to_float(ds.images[: cfg.train.batch_size]))
    key = jax.random.fold_in(data_key, 0)
    rng = train.run_rng(cfg.train.seed)
    return programs.train_epoch(state, ds.images, ds.labels, key, 0, steps=steps, rng=rng)


@pytest.mark.parametrize(
    "norm, mode",
    [
        ("ghost_batchnorm", "pmap"),  # virtual batches within each device
        ("noisy_batchnorm", "sharded"),  # each device draws its own examples' noise
    ],
)
def test_variants_on_8_devices_equal_one_device(norm, mode, tfds_dir):
    """8 devices x 8 examples against the same global batches of 64 (ghost: 8 virtual batches
    of 8, one per device). The other variants with batch statistics are built the same way
    (`NormSpec(batch_stats=True)`); their pure functions are checked on 8 devices in
    test_norm_variants.py."""
    small = {"train.batch_size": 64, "data.train_size": 256, "norm.virtual_batch_size": 8}
    reference, ref_metrics = _train_steps(_config(tfds_dir, norm, **small))
    state, metrics = _train_steps(_config(tfds_dir, norm, **small, **{"parallel.mode": mode}))
    close = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), a, b
    )
    close((state.params, state.batch_stats), (reference.params, reference.batch_stats))
    close(metrics, ref_metrics)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.norm": "ghost_batchnorm", "norm.virtual_batch_size": 7},
         "norm.virtual_batch_size=7 does not divide the per-device batch of 60 examples"),
        ({"model.norm": "ghost_batchnorm", "norm.virtual_batch_size": 16,
          "train.batch_size": 64, "parallel.mode": "pmap"},
         "norm.virtual_batch_size=16 does not divide the per-device batch of 8 examples"),
        ({"model.norm": "groupnorm", "norm.num_groups": 32},
         "norm.num_groups=32 does not divide the 100 channels of a normalized layer"),
        ({"model.norm": "batch_renorm", "norm.r_max": 0.5}, "norm.r_max=0.5 must be >= 1"),
        ({"model.norm": "batch_renorm", "norm.d_max": -1}, "norm.d_max=-1.0 must be >= 0"),
        ({"model.norm": "noisy_batchnorm", "norm.noise_std": -0.1},
         "norm.noise_std=-0.1 must be >= 0"),
        ({"model.norm": "noisy_batchnorm", "norm.noise_mean": -1},
         "norm.noise_mean=-1.0 must be >= 0"),
    ],
)  # fmt: skip
def test_bad_variant_configs_exit_2_before_anything_runs(overrides, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    code = cli.main(["train", "--config", str(ROOT / "experiments/mnist_cnn.py"),
                     "--workdir", str(workdir), *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not (workdir / "metrics.jsonl").exists()


UNMEASURED = {"diagnostics.names": "''"}
SINGLE_ALLOWED = {"norm.allow_single_value": "true"}


@pytest.mark.parametrize(
    "overrides, message, fix",
    [
        ({"diagnostics.names": "activations", "diagnostics.batch_size": 50},
         "norm.virtual_batch_size=20 does not divide the diagnostic batch of 50 examples "
         "(diagnostics.batch_size); choose one of [1, 2, 5, 10]", UNMEASURED),
        ({"diagnostics.names": "ics,landscape", "diagnostics.batch_size": 30,
          "train.batch_size": 40},
         "norm.virtual_batch_size=20 does not divide the diagnostic batch of 30 examples",
         UNMEASURED),
        ({"norm.virtual_batch_size": 1},
         "norm.virtual_batch_size=1 gives ghost_batchnorm one example per statistic",
         SINGLE_ALLOWED),
        ({"model.norm": "batchnorm", "diagnostics.names": "activations",
          "diagnostics.batch_size": 1},
         "diagnostics.batch_size=1 gives model.norm='batchnorm' one example per statistic",
         SINGLE_ALLOWED),
    ],
)  # fmt: skip
def test_every_batch_the_run_normalizes_is_checked_before_it_runs(overrides, message, fix):
    """The diagnostics normalize their fixed batch in training mode: a virtual batch size that
    divides the training batch but not that one used to crash at the first measurement."""
    overrides = {**SMALL, "model.norm": "ghost_batchnorm", **overrides}
    raw = config.apply_overrides(config.default_config(), {k: str(v) for k, v in overrides.items()})
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(raw)
    config.validate(config.apply_overrides(raw, fix))  # the fix the message names


@pytest.mark.parametrize("nnx", [False, True])
def test_ghost_batchnorm_honours_allow_single_value(nnx):
    """Virtual batches of one example in a dense layer: refused unless norm.allow_single_value,
    as for batchnorm; allowed, the output is the bias and the statistics move as the paper's."""
    x = np.random.default_rng(60).standard_normal((4, 3)).astype(np.float32)
    allowed = config.validate(config.apply_overrides(config.default_config(), {
        "model.norm": "ghost_batchnorm", "model.name": "mlp", "norm.virtual_batch_size": "1",
        "norm.allow_single_value": "true", "norm.momentum": "0.5"}))  # fmt: skip

    def train(allow):
        cfg = dataclasses.replace(
            allowed, norm=dataclasses.replace(allowed.norm, allow_single_value=allow)
        )
        if nnx:
            from flax import nnx as flax_nnx

            layer = norms.get("ghost_batchnorm").nnx(cfg.norm, 3, {}, flax_nnx.Rngs(0))
            return layer(x), {"mean": layer.mean[...], "var": layer.var[...]}
        layer = norms.build(cfg)()
        variables = layer.init(jax.random.key(0), x, use_running_average=True)
        y, new = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, new["batch_stats"]

    with pytest.raises(ValueError, match="one value per feature"):
        train(False)
    y, stats = train(True)
    np.testing.assert_array_equal(y, np.zeros_like(x))  # bias 0: each example is its own mean
    np.testing.assert_allclose(stats["mean"], 0.5 * x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], np.full(3, 0.5), rtol=1e-6)  # 0.5 * 1 + 0.5 * 0


def test_groupnorm_error_lists_the_group_counts_that_fit():
    with pytest.raises(
        config.ConfigError, match=r"choose one of \[1, 2, 4, 5, 10, 20, 25, 50, 100\]"
    ):
        config.validate(config.apply_overrides(config.default_config(), {
            "model.norm": "groupnorm", "model.name": "mlp", "norm.num_groups": "30"}))  # fmt: skip
    # The CNN's 32, 64 and 256 channels take 32 groups (the default), and 64 (the layer of 32
    # channels then normalizes each channel on its own).
    for groups in ("32", "64"):
        config.validate(config.apply_overrides(config.default_config(), {
            "model.norm": "groupnorm", "norm.num_groups": groups}))  # fmt: skip


@pytest.mark.parametrize("norm", [n for n in norms.NORMS if norms.NORMS[n].injected])
def test_injected_fields_may_vary_within_one_vmapped_program(norm, tfds_dir):
    """The layer built from a `norm` config whose `NormSpec.injected` fields are traced arrays
    equals, trial by trial, the layer built from each trial's plain values."""
    cfg = _config(tfds_dir, norm)
    spec = norms.get(norm)
    values = {k: jnp.asarray([0.5, 0.9] if k == "momentum" else [1.2, 0.3]) for k in spec.injected}
    x = jax.random.normal(jax.random.key(0), (BATCH, 6)) * 2 + 1

    def apply(trial_values):
        layer = norms.build(
            dataclasses.replace(cfg, norm=dataclasses.replace(cfg.norm, **trial_values))
        )()
        variables = layer.init(jax.random.key(1), x, use_running_average=True)
        return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                           rngs={"noise": jax.random.key(2)})  # fmt: skip

    vmapped = jax.jit(jax.vmap(apply))(values)
    for i in range(2):
        alone = apply({k: float(v[i]) for k, v in values.items()})
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     vmapped, alone)  # fmt: skip


# --- the extension point ----------------------------------------------------------------------

RMS_EXPERIMENT = '''
"""RMS normalization, registered from an experiment file: nothing under bnlab/ changes."""

import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from bnlab import norms, schema
from bnlab.config import default_config


def rms_norm(x, scale, *, epsilon):
    """x / sqrt(mean(x**2) + epsilon) * scale, the mean over each example's features."""
    axes = tuple(range(1, x.ndim))
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axes, keepdims=True)
    return (x * lax.rsqrt(ms + epsilon) * scale).astype(x.dtype)


class RMSNorm(nn.Module):
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x, use_running_average=None):
        del use_running_average  # no state
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x, scale, epsilon=self.epsilon)


norms.register_norm(
    "rms_test",
    norms.NormSpec(
        layer=lambda n, axis: functools.partial(RMSNorm, epsilon=n.rms_epsilon),
        doc="RMS normalization (an experiment's own)",
        fields={"rms_epsilon": schema.field(1e-6, "added to the mean square",
                                            check=schema.positive)},
    ),
)
SMOKE = {"data.train_size": 240, "train.epochs": 1}


def get_config():
    c = default_config()
    c.model.norm = "rms_test"
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.train.batch_size = 60
    c.train.epochs = 1
    c.data.train_size = 240
    c.norm.rms_epsilon = 1e-5
    return c


def sweep(smoke=False):
    for seed in range(2):
        yield {"train.seed": seed}
'''


@pytest.fixture
def rms_experiment(tmp_path):
    path = tmp_path / "rms_experiment.py"
    path.write_text(textwrap.dedent(RMS_EXPERIMENT))
    yield path
    if "rms_test" in norms.NORMS:  # the registry is global: leave it as found
        norms.unregister_norm("rms_test")


def test_an_experiment_file_registers_a_norm_that_trains_and_sweeps(
    rms_experiment, tmp_path, tfds_dir
):
    assert "rms_test" not in norms.NORMS  # until the experiment file is loaded
    data_dir = f"--config.data.tfds_dir={tfds_dir}"
    workdir = tmp_path / "train"
    assert cli.main(["train", "--config", str(rms_experiment), "--workdir", str(workdir),
                     data_dir, "--no-progress"]) == 0  # fmt: skip
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["norm"] == "rms_test" and saved["norm"]["rms_epsilon"] == 1e-5
    params = run.load_checkpoint(workdir)[1].state.params
    assert set(params["block0"]["norm"]) == {"scale"}
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["sweep", str(rms_experiment), "--workdir", str(sweep_dir), "--engine",
                     "vmap", data_dir]) == 0  # fmt: skip
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("runs/*/summary.json"))]
    assert [(s["status"], s["engine"]) for s in summaries] == [("ok", "vmap")] * 2
    bad = cli.main(["train", "--config", str(rms_experiment), "--workdir", str(tmp_path / "bad"),
                    data_dir, "--config.norm.rms_epsilon=-1"])  # fmt: skip
    assert bad == 2


@pytest.mark.slow
def test_a_run_of_an_experiments_own_norm_evaluates_in_a_fresh_process(
    rms_experiment, tmp_path, tfds_dir
):
    """`bnlab evaluate`/`export` import the experiment file the run (or its sweep) recorded,
    so its normalization is registered again in a new process."""
    import subprocess
    import sys

    from conftest import ROOT

    data_dir = f"--config.data.tfds_dir={tfds_dir}"
    workdir, sweep_dir = tmp_path / "train", tmp_path / "sweep"
    assert cli.main(["train", "--config", str(rms_experiment), "--workdir", str(workdir),
                     data_dir, "--no-progress"]) == 0  # fmt: skip
    assert cli.main(["sweep", str(rms_experiment), "--workdir", str(sweep_dir), data_dir]) == 0
    trial = next(sweep_dir.glob("runs/*"))
    for folder in (workdir, trial):
        for command in (["evaluate", str(folder)], ["export", str(folder), "--format", "npz"]):
            result = subprocess.run(
                [sys.executable, "-m", "bnlab.cli", *command, f"--tfds-dir={tfds_dir}"]
                if command[0] == "evaluate"
                else [sys.executable, "-m", "bnlab.cli", *command],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stderr[-2000:]


def test_a_taken_name_or_field_is_an_error_naming_both_places():
    spec = norms.NormSpec(layer=lambda n, axis: None)
    with pytest.raises(ValueError, match=r"'batchnorm' is already registered \(at .*norms.py"):
        norms.register_norm("batchnorm", spec)
    field = {"num_groups": schema.field(4, "a clash")}
    with pytest.raises(ValueError, match="norm.num_groups, which 'groupnorm' already declares"):
        norms.register_norm("clash_test", norms.NormSpec(layer=spec.layer, fields=field))
    with pytest.raises(ValueError, match="which 'every normalization' already declares"):
        norms.register_norm(
            "clash_test", norms.NormSpec(layer=spec.layer, fields={"epsilon": field["num_groups"]})
        )
    assert "clash_test" not in norms.NORMS


def _register(registry, name, spec):
    """Registers whatever it is given: every call has the same origin (this line)."""
    return registry.register(name, spec)


def _gn(n, axis, groups):
    return functools.partial(norms.layers.GroupNorm, num_groups=groups)


@pytest.mark.parametrize(
    "registry, first, other",
    [
        (norms.NORMS, norms.NormSpec(layer=lambda n, axis: norms.layers.LayerNorm),
         norms.NormSpec(layer=lambda n, axis: norms.layers.GroupNorm)),
        (norms.NORMS, norms.NormSpec(layer=functools.partial(_gn, groups=2)),
         norms.NormSpec(layer=functools.partial(_gn, groups=4))),
        (norms.NORMS, norms.NormSpec(layer=_gn, fields={"helper_k": schema.field(2, "k")}),
         norms.NormSpec(layer=_gn, fields={"helper_k": schema.field(3, "k")})),
        (diagnostics.DIAGNOSTICS, diagnostics.DiagnosticSpec(fn=lambda ctx: {"a": 1.0}),
         diagnostics.DiagnosticSpec(fn=lambda ctx: {"a": 2.0})),
    ],
)  # fmt: skip
def test_a_helper_cannot_replace_another_piece_under_a_taken_name(registry, first, other):
    """Both calls share the helper's origin: what is registered decides, not where from."""
    registered = _register(registry, "helper_test", first)
    assert _register(registry, "helper_test", dataclasses.replace(first)) is not registered
    with pytest.raises(ValueError, match="'helper_test' is already registered") as err:
        _register(registry, "helper_test", other)
    assert registered.origin in str(err.value)
    assert registry.get_spec("helper_test") == dataclasses.replace(first, origin=registered.origin)


def test_an_experiment_file_loaded_twice_registers_once(rms_experiment):
    """New functions, classes and fields of the same source: the same piece, replaced."""
    first = config.load_module(rms_experiment)
    spec = norms.get("rms_test")
    second = config.load_module(rms_experiment)
    assert first.RMSNorm is not second.RMSNorm and norms.get("rms_test") is not spec
    changed = rms_experiment.with_name("rms_changed.py")
    changed.write_text(rms_experiment.read_text().replace("1e-6, ", "1e-7, "))
    with pytest.raises(config.ConfigError, match="'rms_test' is already registered"):
        config.load_module(changed)

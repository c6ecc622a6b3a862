"""Vmapped trials: grouping by structure, each trial equal to the same trial run alone."""

import json

import numpy as np
import pytest

from bnlab import config
from bnlab.training import batched, run
from bnlab.training.writers import read_jsonl

BATCH = 60
RELU_MLP = {
    "model.name": "mlp",
    "model.activation": "relu",
    "model.norm": "none",
    "model.init": "he_normal",
    "opt.name": "momentum",
    "opt.schedule": "step",
    "train.batch_size": BATCH,
    "data.train_size": 600,
    "train.epochs": 2,
    "train.log_every_steps": 3,
}


def _assert_same_records(got_dir, want_dir):
    got, want = read_jsonl(got_dir / "metrics.jsonl"), read_jsonl(want_dir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            if w[key] is None or isinstance(w[key], str):  # None: a NaN
                assert g[key] == w[key], key
            elif key == "accuracy":  # float round-off may flip one borderline prediction
                examples = 10_000 if w["split"] == "test" else w["window"] * BATCH
                np.testing.assert_allclose(g[key], w[key], atol=1.01 / examples, err_msg=key)
            elif key.startswith("act_p"):  # percentiles of O(1) BN outputs
                np.testing.assert_allclose(g[key], w[key], atol=1e-3, err_msg=key)
            else:
                np.testing.assert_allclose(g[key], w[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_vmapped_trials_equal_single_runs_and_a_diverged_one_stops_alone(make_config, tmp_path):
    # Different seeds and every injected hyperparameter; one learning rate that blows up.
    trials = [
        {"train.seed": 0, "opt.lr": 0.05},
        {"train.seed": 1, "opt.lr": 0.02, "opt.momentum": 0.5, "opt.decay_rate": 0.5},
        {"train.seed": 2, "opt.lr": 300.0},  # NaN within the first epoch
    ]
    configs = [make_config(**{**RELU_MLP, **t}) for t in trials]
    assert len(batched.group_by_structure(configs)) == 1
    dirs = [tmp_path / f"vmap{i}" for i in range(3)]
    summaries = batched.run_group(configs, dirs, max_chunk=2)  # chunks of 2 and 1
    assert [s["status"] for s in summaries] == ["ok", "ok", "diverged"]
    for i, cfg in enumerate(configs):
        alone = run.run(cfg, tmp_path / f"alone{i}")
        assert summaries[i]["status"] == alone["status"]
        assert summaries[i]["steps"] == alone["steps"] and summaries[i]["epochs"] == alone["epochs"]
        _assert_same_records(dirs[i], tmp_path / f"alone{i}")
        assert json.loads((dirs[i] / "config.json").read_text()) == json.loads(
            json.dumps(cfg.to_dict())
        )
    # the diverged trial stopped after its first epoch; its siblings trained both
    assert [s["epochs"] for s in summaries] == [2, 2, 1]
    # the final state is a checkpoint: it evaluates to the trial's last test record
    for i in (0, 1):
        final = run.evaluate(dirs[i])
        assert final["step"] == summaries[i]["steps"]
        np.testing.assert_allclose(final["accuracy"], summaries[i]["test_accuracy"], rtol=1e-6)
        np.testing.assert_allclose(final["loss"], summaries[i]["test_loss"], rtol=1e-5)


RENORM_SOON = {"norm.renorm_warmup_steps": 2, "norm.r_max_steps": 6, "norm.d_max_steps": 4}


@pytest.mark.parametrize(
    "norm, trials",
    [
        ("batch_renorm", [{"norm.momentum": 0.9, "norm.r_max": 2.0, "norm.d_max": 1.0},
                          {"train.seed": 1, "norm.momentum": 0.5, "norm.r_max": 4.0,
                           "norm.d_max": 0.25, "opt.lr": 0.02}]),
        ("noisy_batchnorm", [{"norm.noise_std": 0.5, "norm.noise_mean": 0.0},
                             {"norm.noise_std": 1.5, "norm.noise_mean": 0.3,
                              "norm.momentum": 0.5}]),
    ],
)  # fmt: skip
def test_trials_apart_in_injected_norm_fields_share_one_program_and_equal_single_runs(
    norm, trials, make_config, tmp_path
):
    base = {**RELU_MLP, "model.norm": norm, "train.epochs": 1, **RENORM_SOON}
    configs = [make_config(**{**base, **t}) for t in trials]
    assert batched.group_by_structure(configs) == [[0, 1]]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    summaries = batched.run_group(configs, dirs)
    for i, cfg in enumerate(configs):
        alone = run.run(cfg, tmp_path / f"alone{i}")
        assert summaries[i]["status"] == alone["status"] == "ok"
        _assert_same_records(dirs[i], tmp_path / f"alone{i}")
    # Diagnostics measure one model per group: then each value gets a program of its own.
    measured = [make_config(**{**base, **t, "diagnostics.names": "ics"}) for t in trials]
    assert batched.group_by_structure(measured) == [[0], [1]]


def test_group_by_structure(make_config):
    configs = [
        make_config(**RELU_MLP),
        make_config(**{**RELU_MLP, "train.seed": 3, "opt.lr": 0.3, "opt.clip_value": 2.0}),
        make_config(**{**RELU_MLP, "model.norm": "batchnorm"}),
        make_config(**{**RELU_MLP, "train.batch_size": 30}),
        make_config(**{**RELU_MLP, "opt.weight_decay": 1e-4}),  # adds an L2 step to the chain
        make_config(**{**RELU_MLP, "opt.weight_decay": 1e-3, "train.seed": 1}),
        make_config(**{**RELU_MLP, "opt.schedule": "cosine"}),
    ]
    assert batched.group_by_structure(configs) == [[0, 1], [2], [3], [4, 5], [6]]


def test_run_group_refuses_mixed_structures(make_config, tmp_path):
    configs = [make_config(**RELU_MLP), make_config(**{**RELU_MLP, "model.norm": "batchnorm"})]
    with pytest.raises(config.ConfigError, match="differ"):
        batched.run_group(configs, [tmp_path / "a", tmp_path / "b"])


def test_chunk_size_follows_memory(make_config, monkeypatch):
    import jax.numpy as jnp

    small_eval = {**RELU_MLP, "train.eval_batch_size": 100}  # memory follows the train batch
    cfg = make_config(**small_eval)
    sample = jnp.zeros((60, 28, 28, 1))
    assert batched.chunk_size(cfg, 100, sample) == 100  # a tiny MLP: all fit in host memory
    monkeypatch.setattr(batched, "_device_memory", lambda: 40_000_000)
    few = batched.chunk_size(cfg, 100, sample)
    big = make_config(**{**small_eval, "train.batch_size": 600})
    fewer = batched.chunk_size(big, 100, jnp.zeros((600, 28, 28, 1)))
    assert 1 <= fewer < few < 100


def test_a_stopped_group_saves_every_trial_and_each_resumes_alone(
    make_config, tmp_path, monkeypatch
):
    import os
    import signal

    configs = [
        make_config(**{**RELU_MLP, "train.epochs": 3, "checkpoint.every_steps": 10, **t})
        for t in ({"train.seed": 0}, {"train.seed": 1, "opt.lr": 0.02})
    ]
    reference = [tmp_path / f"ref{i}" for i in range(2)]
    batched.run_group(configs, reference)

    from bnlab.training.records import Record

    end_epoch = Record.end_epoch

    def record_then_signal(record, epoch, *args):
        end_epoch(record, epoch, *args)
        if epoch == 0 and record.cfg.train.seed == 1:  # SIGTERM during the first epoch's end
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Record, "end_epoch", record_then_signal)
    dirs = [tmp_path / f"stopped{i}" for i in range(2)]
    with pytest.raises(run.Interrupted):
        batched.run_group(configs, dirs)
    for d in dirs:  # each trial saved at step 10 and is not finished
        assert not (d / "summary.json").exists()
        assert run.load_checkpoint(d)[1].step == 10
    for cfg, d, ref in zip(configs, dirs, reference, strict=True):
        summary = run.run(cfg, d)  # the single-run trainer resumes it
        assert summary["steps"] == 30 and summary["status"] == "ok"
        _assert_same_records(d, ref)


def test_vmapped_bn_trials_with_clipping_decay_warmup_and_probe_equal_single_runs(
    make_config, tmp_path
):
    import jax

    common = {
        **RELU_MLP,
        "model.norm": "batchnorm",
        # Not Adam: BN cancels the bias of the dense layer before it, so that bias's gradient
        # is round-off noise, which Adam scales to steps of size lr: two float orderings then
        # differ by far more than round-off (test_optim checks vmapped Adam exactly).
        "opt.name": "nesterov",
        "opt.clip": "global_norm",
        "opt.schedule": "warmup_cosine",
        "opt.warmup_steps": 3,
        "train.epochs": 1,
        "train.probe_unit": 5,
    }
    configs = [
        make_config(**{**common, "opt.lr": 0.05, "opt.weight_decay": 1e-4, "opt.clip_value": 1.0}),
        make_config(
            **{
                **common,
                "opt.lr": 1e-2,
                "opt.weight_decay": 1e-2,
                "opt.clip_value": 0.5,
                "train.seed": 4,
            }
        ),  # fmt: skip
    ]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    batched.run_group(configs, dirs)
    for i, cfg in enumerate(configs):
        run.run(cfg, tmp_path / f"alone{i}")
        _assert_same_records(dirs[i], tmp_path / f"alone{i}")
        tests = [r for r in read_jsonl(dirs[i] / "metrics.jsonl") if r["split"] == "test"]
        assert tests and all({"act_p15", "act_p50", "act_p85"} <= r.keys() for r in tests)
        got = run.load_checkpoint(dirs[i])[1].state
        want = run.load_checkpoint(tmp_path / f"alone{i}")[1].state
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_vmapped_trials_keep_their_best_checkpoint_as_single_runs_do(make_config, tmp_path):
    """checkpoint.best_metric: every epoch end is saved and ranked, the best one is kept beside
    the latest, in a vmapped trial exactly as in the same trial run alone."""
    import jax

    common = {**RELU_MLP, "train.epochs": 4, "opt.lr": 0.3, "checkpoint.every_steps": 0}
    common |= {"checkpoint.best_metric": "accuracy", "checkpoint.keep": 1}
    configs = [make_config(**{**common, "train.seed": seed}) for seed in (0, 1)]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    batched.run_group(configs, dirs)
    for i, cfg in enumerate(configs):
        alone = tmp_path / f"alone{i}"
        run.run(cfg, alone)
        kept = sorted(int(p.name) for p in (dirs[i] / "checkpoints").iterdir())
        assert kept == sorted(int(p.name) for p in (alone / "checkpoints").iterdir())
        tests = [r for r in read_jsonl(alone / "metrics.jsonl") if r["split"] == "test"]
        best = max(tests, key=lambda r: r["accuracy"])["step"]
        assert kept == sorted({best, 40})  # the best epoch's and the latest
        for step in kept:
            got = run.load_checkpoint(dirs[i], step=step)[1].state
            want = run.load_checkpoint(alone, step=step)[1].state
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want
            )

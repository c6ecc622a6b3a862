"""A validation split, dropout, reduce-on-plateau and early stopping: single runs, vmapped
trials and resumed runs agree; bad input fails with the fix."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnlab import cli, config, data, optim
from bnlab.training import batched, run, train
from bnlab.training.records import Record
from bnlab.training.writers import read_jsonl

MLP = "experiments/bn_paper_mlp.py"
SMALL = {"data.train_size": 600, "data.validation_size": 1200, "train.log_every_steps": 5}


def _records(workdir, split):
    return [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == split]


def test_the_validation_split_is_the_last_training_examples_for_every_seed(make_config):
    full = data.load(make_config(MLP).data, "train")
    for seed in (0, 3):
        cfg = make_config(MLP, **SMALL, **{"train.seed": seed})
        splits = run.load_splits(cfg)
        np.testing.assert_array_equal(splits.validation.images, full.images[-1200:])
        np.testing.assert_array_equal(splits.validation.labels, full.labels[-1200:])
        np.testing.assert_array_equal(splits.train.labels, full.labels[:600])
    whole = run.load_splits(make_config(MLP, **{"data.validation_size": 1200}))
    assert whole.train.size == full.size - 1200  # training never sees the held-out examples
    assert run.load_splits(make_config(MLP)).validation is None


def test_a_run_evaluates_validation_at_every_epoch_end(make_config, tmp_path):
    cfg = make_config(MLP, **SMALL, **{"train.epochs": 2})
    summary = run.run(cfg, tmp_path / "run")
    validation = _records(tmp_path / "run", "validation")
    assert [r["step"] for r in validation] == [10, 20]
    assert summary["validation_accuracy"] == pytest.approx(validation[-1]["accuracy"])
    # The same numbers as evaluating the held-out examples directly.
    state = run.load_checkpoint(tmp_path / "run")[1].state
    v = run.load_splits(cfg).validation
    programs = train.make_programs(cfg, 600)
    direct = programs.evaluate(state.params, state.batch_stats, v.images, v.labels)
    np.testing.assert_allclose(validation[-1]["loss"], direct["loss"], rtol=1e-6)


def test_train_eval_measures_training_examples_in_evaluation_mode(make_config, tmp_path):
    """`data.train_eval_size`: the first N training examples evaluated as test is (running
    statistics, dropout off), not the training windows' batch statistics and active dropout."""
    cfg = make_config(MLP, **SMALL, **{"train.epochs": 1, "model.dropout": 0.5,
                                       "data.train_eval_size": 300})  # fmt: skip
    summary = run.run(cfg, tmp_path / "run")
    (record,) = _records(tmp_path / "run", "train_eval")
    assert summary["train_eval_accuracy"] == record["accuracy"]
    state = run.load_checkpoint(tmp_path / "run")[1].state
    t = run.load_splits(cfg).train
    programs = train.make_programs(cfg, 600)
    direct = programs.evaluate(state.params, state.batch_stats, t.images[:300], t.labels[:300])
    np.testing.assert_allclose(record["loss"], direct["loss"], rtol=1e-6)
    np.testing.assert_allclose(record["accuracy"], direct["accuracy"], rtol=1e-6)
    window = _records(tmp_path / "run", "train")[-1]  # dropout active: a different number
    assert abs(window["loss"] - record["loss"]) > 1e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.validation_size": 59990}, "leaves 10 of the 60000 training examples"),
        ({"model.dropout": 1.0}, "model.dropout=1.0 must lie in [0, 1)"),
        ({"model.dropout": -0.1}, "model.dropout=-0.1 must lie in [0, 1)"),
        ({"opt.schedule": "plateau"}, "set data.validation_size"),
        ({"train.early_stopping_patience": 2}, "set data.validation_size"),
        ({"opt.schedule": "plateau", "data.validation_size": 100, "opt.plateau_patience": 0},
         "opt.plateau_patience=0 must be >= 1"),
        ({"train.early_stopping_patience": -1}, "train.early_stopping_patience=-1 must be >= 0"),
        ({"opt.schedule": "plateau", "data.validation_size": 100, "opt.decay_rate": 2.0},
         "must lie in (0, 1) with opt.schedule='plateau'"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_the_fix(tmp_path, tfds_dir, capsys, overrides, message):
    args = ["train", "--config", MLP, "--workdir", str(tmp_path / "run"), "--no-progress"]
    args += [f"--config.data.tfds_dir={tfds_dir}", "--config.train.epochs=1"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_dropout_is_random_in_training_only_and_follows_the_run_key(make_config):
    cfg = make_config(MLP, **{"model.dropout": 0.5, "model.activation": "relu"})
    model = train.build_model(cfg)
    x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    variables = model.init(jax.random.key(1), x, train=False)
    evaluate = model.apply(variables, x, train=False)
    no_dropout = train.build_model(make_config(MLP, **{"model.activation": "relu"}))
    np.testing.assert_array_equal(evaluate, no_dropout.apply(variables, x, train=False))
    rngs = train.step_rngs(train.run_rng(0), jnp.int32(3))

    def trained(rngs):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]

    np.testing.assert_array_equal(trained(rngs), trained(rngs))  # a function of key and step
    other = train.step_rngs(train.run_rng(0), jnp.int32(4))
    assert not np.array_equal(trained(rngs), trained(other))
    assert not np.array_equal(trained(rngs), evaluate)


def test_dropout_runs_vmapped_equal_single_and_resume_bit_identical(make_config, tmp_path):
    common = {**SMALL, "model.dropout": 0.3, "train.epochs": 2, "checkpoint.every_steps": 5}
    common["train.probe_unit"] = 3  # the Fig. 1 probe, measured on both evaluated splits
    configs = [make_config(MLP, **common, **{"train.seed": s}) for s in (0, 1)]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    batched.run_group(configs, dirs)
    run.run(configs[1], tmp_path / "alone")
    for split in ("train", "validation", "test"):
        got, want = _records(dirs[1], split), _records(tmp_path / "alone", split)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g["loss"], w["loss"], rtol=2e-5)
            if split != "train":
                probe = [g[f"act_p{q}"] for q in (15, 50, 85)]
                np.testing.assert_allclose(probe, [w[f"act_p{q}"] for q in (15, 50, 85)], atol=1e-4)
                assert probe == sorted(probe) and probe[0] < probe[2]
    _interrupt_after_epoch(configs[1], tmp_path / "resumed", epoch=0)
    run.run(configs[1], tmp_path / "resumed")
    got = (tmp_path / "resumed" / "metrics.jsonl").read_bytes()
    assert got == (tmp_path / "alone" / "metrics.jsonl").read_bytes()


def _interrupt_after_epoch(cfg, workdir, *, epoch):
    """Runs `cfg` until SIGTERM at the end of `epoch` (a checkpoint is saved there)."""
    end_epoch = Record.end_epoch

    def stop(record, e, evals):
        end_epoch(record, e, evals)
        if e == epoch:
            os.kill(os.getpid(), signal.SIGTERM)

    Record.end_epoch = stop
    try:
        with pytest.raises(run.Interrupted):
            run.run(cfg, workdir)
    finally:
        Record.end_epoch = end_epoch


def test_plateau_steps_follow_optax_reduce_on_plateau(make_config):
    """The epoch-end update is optax's own rule: the scale after each epoch equals what
    `optax.contrib.reduce_on_plateau` gives when fed the same validation losses."""
    cfg = make_config(
        MLP,
        **{"opt.schedule": "plateau", "data.validation_size": 100, "opt.decay_rate": 0.5},
        **{"opt.plateau_patience": 2, "opt.plateau_cooldown": 1, "opt.plateau_min_scale": 0.2},
    )
    tx, _ = optim.make_optimizer(cfg.opt, 100)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    reference = optax.contrib.reduce_on_plateau(
        factor=0.5, patience=2, rtol=cfg.opt.plateau_threshold, cooldown=1, min_scale=0.2
    )
    ref_state = reference.init(params)
    losses = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2]
    scales = []
    for loss in losses:
        opt_state = optim.plateau_step(opt_state, loss, cfg.opt)
        ref_state = reference.update(updates=params, state=ref_state, value=loss)[1]
        assert float(optim.lr_scale(opt_state)) == pytest.approx(float(ref_state.scale))
        scales.append(float(optim.lr_scale(opt_state)))
    assert scales[0] == 1.0 and min(scales) == pytest.approx(0.2)  # drops, down to the floor
    # Between epochs the steps scale their updates by it.
    updates, _ = tx.update({"w": jnp.ones(3)}, opt_state, params)
    np.testing.assert_allclose(updates["w"], -cfg.opt.lr * 0.2 * np.ones(3), rtol=1e-6)


def test_a_stalled_run_lowers_its_lr_and_vmapped_trials_do_the_same(make_config, tmp_path):
    common = {
        **SMALL,
        "opt.schedule": "plateau",
        "opt.plateau_patience": 1,
        "opt.decay_rate": 0.5,
        "opt.plateau_threshold": 0.5,  # a stall: less than 50% better than the best
        "train.epochs": 4,
    }
    configs = [
        make_config(MLP, **common),
        make_config(MLP, **{**common, "train.seed": 1, "opt.decay_rate": 0.1}),
    ]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    batched.run_group(configs, dirs)
    for i, cfg in enumerate(configs):
        run.run(cfg, tmp_path / f"alone{i}")
        lrs = [r["lr"] for r in _records(tmp_path / f"alone{i}", "train")]
        factor = cfg.opt.decay_rate
        assert lrs[0] == pytest.approx(cfg.opt.lr) and lrs[-1] < cfg.opt.lr
        assert all(
            np.isclose(b, a) or np.isclose(b, a * factor)
            for a, b in zip(lrs[:-1], lrs[1:], strict=True)
        )
        got = [r["lr"] for r in _records(dirs[i], "train")]
        np.testing.assert_allclose(got, lrs, rtol=1e-6)


def test_early_stopping_stops_each_trial_at_its_own_epoch(make_config, tmp_path):
    common = {**SMALL, "train.epochs": 8, "train.early_stopping_patience": 1}
    common |= {"checkpoint.best_metric": "loss", "checkpoint.keep": 1}
    configs = [  # lr 3: the validation loss soon stops improving; lr 0.5: later
        make_config(MLP, **common, **{"opt.lr": 3.0, "model.norm": "batchnorm"}),
        make_config(MLP, **common, **{"opt.lr": 0.5, "model.norm": "batchnorm"}),
    ]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    summaries = batched.run_group(configs, dirs)
    stopped = [s["epochs"] for s in summaries]
    assert any(s["status"] == "early_stopped" for s in summaries), summaries
    for i, cfg in enumerate(configs):
        alone = run.run(cfg, tmp_path / f"alone{i}")
        assert (alone["status"], alone["epochs"]) == (summaries[i]["status"], stopped[i])
        if alone["status"] == "early_stopped":
            best = alone["best_epoch"]
            assert alone["reported"] == "best"  # reports read the best validation epoch's
            validation = _records(tmp_path / f"alone{i}", "validation")
            losses = [r["loss"] for r in validation]
            assert best == int(np.argmin(losses)) and alone["epochs"] == best + 2  # patience 1
            assert alone["best_test_accuracy"] == pytest.approx(
                _records(tmp_path / f"alone{i}", "test")[best]["accuracy"]
            )
            kept = sorted(int(p.name) for p in (tmp_path / f"alone{i}" / "checkpoints").iterdir())
            assert (best + 1) * 10 in kept  # the best checkpoint is kept
        for split in ("validation", "test"):
            got, want = _records(dirs[i], split), _records(tmp_path / f"alone{i}", split)
            np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], 2e-5)


def test_early_stopping_resumes_bit_identical(make_config, tmp_path):
    cfg = make_config(
        MLP, **SMALL, **{"train.epochs": 8, "train.early_stopping_patience": 1, "opt.lr": 3.0}
    )
    reference = run.run(cfg, tmp_path / "ref")
    assert reference["status"] == "early_stopped"
    _interrupt_after_epoch(cfg, tmp_path / "run", epoch=reference["epochs"] - 2)
    assert run.run(cfg, tmp_path / "run") == {
        **reference,
        "wall_time_s": pytest.approx(reference["wall_time_s"], rel=10),
        "train_examples_per_s": pytest.approx(reference["train_examples_per_s"], rel=10),
    }
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_bytes()


def test_config_fields_exist_with_their_defaults():
    c = config.validate(config.default_config())
    assert c.data.validation_size == 0 and c.model.dropout == 0.0
    assert c.train.early_stopping_patience == 0 and c.opt.plateau_patience >= 1

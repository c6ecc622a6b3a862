"""`opt.trainable`: "norm" trains the normalization layers' parameters alone (Frankle et al.
2021); every other parameter keeps its initial value, bit for bit, whatever the chain holds."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT
from test_checkpoint import _assert_same_run

from bnlab import cli, optim
from bnlab.config import ConfigError
from bnlab.training import batched, run
from bnlab.training import train as train_lib

MLP = "experiments/bn_paper_mlp.py"
SHORT = {"data.train_size": 600, "train.epochs": 1}  # 10 steps of 60 examples
# Every chain element that would move a frozen parameter if it saw one.
HEAVY = {"opt.name": "momentum", "opt.weight_decay": 1e-3, "opt.clip": "global_norm"}


def _is_norm(path) -> bool:
    return "norm" in optim._path_names(path)


def _leaves(params):
    """`{(path, is_norm): leaf}` of a params tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {(jax.tree_util.keystr(p), _is_norm(p)): leaf for p, leaf in flat}


def _initial_params(cfg):
    """The params a run of `cfg` starts from (they depend on the key and the shapes alone)."""
    sample = jnp.zeros((cfg.train.batch_size, 28, 28, 1), jnp.float32)
    return train_lib.make_programs(cfg, 600).init(train_lib.run_keys(cfg.train.seed)[0], sample)


@pytest.mark.parametrize("trainable", ["norm", "all"])
def test_a_run_moves_only_what_it_trains(trainable, make_config, tmp_path):
    cfg = make_config(
        MLP, **SHORT, **HEAVY, **{"opt.trainable": trainable, "checkpoint.every_steps": 5}
    )
    summary = run.run(cfg, tmp_path / "run")
    assert summary["status"] == "ok" and summary["steps"] == 10
    start = _leaves(_initial_params(cfg).params)
    end = _leaves(run.load_checkpoint(tmp_path / "run")[1].state.params)
    assert start.keys() == end.keys()
    assert sum(is_norm for _, is_norm in start) == 6  # 3 blocks' scale and bias
    for (path, is_norm), leaf in start.items():
        moved = not np.array_equal(end[path, is_norm], leaf)
        assert moved == (is_norm or trainable == "all"), path
        if not moved:
            assert end[path, is_norm].tobytes() == np.asarray(leaf).tobytes(), path
    if trainable == "norm":  # resumed mid-epoch (step 5), it ends as the uninterrupted run
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "run", resumed)
        (resumed / "summary.json").unlink()
        shutil.rmtree(resumed / "checkpoints" / "10")
        run.run(cfg, resumed)
        _assert_same_run(resumed, tmp_path / "run")


def _params():
    """A tree shaped as the models' params: dense layers, and normalization layers under a
    module named "norm" (scale and bias), and a head."""
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {
        "dense0": {"kernel": draw(5, 4), "bias": draw(4)},
        "block0": {"norm": {"scale": 1 + draw(4), "bias": draw(4)}},
        "head": {"kernel": draw(4, 3), "bias": draw(3)},
    }


CHAINS = {
    "momentum+l2+clip": {"name": "momentum", "weight_decay": 0.1, "clip": "global_norm"},
    "adamw": {"name": "adamw", "weight_decay": 0.1, "clip": "adaptive"},
    "nesterov+plateau": {"name": "nesterov", "schedule": "plateau", "weight_decay": 0.1},
}


@pytest.mark.parametrize("chain", CHAINS)
def test_chain_gives_zero_updates_to_frozen_leaves(chain):
    """Three steps with weight decay and momentum: the frozen leaves' updates are exactly 0;
    the norm leaves' are those of the whole chain given the norm parameters alone."""
    c = optim.OptConfig(**CHAINS[chain], trainable="norm")
    params = _params()
    tx, _ = optim.make_optimizer(c, 100)
    ref_tx, _ = optim.make_optimizer(dataclasses.replace(c, trainable="all"), 100)
    norm_of = lambda tree: {"block0": tree["block0"]}  # noqa: E731
    state, ref_state, ref_params = tx.init(params), ref_tx.init(norm_of(params)), norm_of(params)
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (s + 2)), params)
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = ref_tx.update(norm_of(grads), ref_state, ref_params)
        for (path, is_norm), u in _leaves(updates).items():
            assert is_norm or not np.any(np.asarray(u)), path
        jax.tree.map(np.testing.assert_array_equal, norm_of(updates), ref_updates)
        assert all(np.any(np.asarray(u)) for u in jax.tree.leaves(norm_of(updates)))
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    frozen = {k: v for k, v in params.items() if k != "block0"}
    jax.tree.map(np.testing.assert_array_equal, frozen,
                 {k: v for k, v in _params().items() if k != "block0"})  # fmt: skip
    assert float(optim.lr_scale(state)) == 1.0  # the plateau state is found inside the mask


def test_vmapped_hyperparameters_keep_the_mask():
    """Injected values traced per trial (a vmapped sweep) give each trial's own updates."""
    c = optim.OptConfig(weight_decay=0.1, trainable="norm")
    params, grads = _params(), jax.tree.map(jnp.sin, _params())
    lrs = jnp.asarray([0.1, 0.3])

    def one(lr):
        values = {**optim.hyperparams(c), "lr": lr}
        tx, _ = optim.make_optimizer(c, 10, values)
        return tx.update(grads, tx.init(params), params)[0]

    vmapped = jax.vmap(one)(lrs)
    for i, lr in enumerate((0.1, 0.3)):
        alone = one(lr)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6), vmapped,
                     alone)  # fmt: skip
        assert not np.any(np.asarray(vmapped["dense0"]["kernel"][i]))


def test_trials_that_train_different_parameters_never_share_a_program(make_config):
    configs = [make_config(MLP, **{"opt.trainable": t, "train.seed": s})
               for t in ("all", "norm") for s in (0, 1)]  # fmt: skip
    assert batched.group_by_structure(configs) == [[0, 1], [2, 3]]
    assert optim.structure(configs[2].opt).trainable == "norm"
    for schedule, depends in (("constant", False), ("cosine", True)):
        c = optim.OptConfig(schedule=schedule, trainable="norm")
        assert optim.depends_on_length(c) is depends


@pytest.mark.parametrize("norm", ["none", "batchnorm_noaffine"])
def test_a_model_without_normalization_parameters_is_refused(norm, make_config):
    cfg = make_config(MLP, **SHORT, **{"model.norm": norm, "opt.trainable": "norm"})
    with pytest.raises(ConfigError, match=r"nothing would train; set opt.trainable=all"):
        _initial_params(cfg)


def test_the_command_refuses_it_with_exit_status_2(tfds_dir, tmp_path, capsys):
    code = cli.main([
        "train", "--config", str(ROOT / MLP), "--workdir", str(tmp_path / "run"), "--no-progress",
        "--config.model.norm=none", "--config.opt.trainable=norm",
        f"--config.data.tfds_dir={tfds_dir}", "--config.data.train_size=600",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing would train" in err and "opt.trainable=all" in err
    assert cli.main(["train", "--config", str(ROOT / MLP), "--workdir", str(tmp_path / "x"),
                     "--config.opt.trainable=some"]) == 2  # fmt: skip
    assert "opt.trainable='some' is not one of ['all', 'norm']" in capsys.readouterr().err

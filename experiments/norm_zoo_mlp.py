"""Every normalization of the registry on the Fig. 1 sigmoid MLP, each at its own learning rate.

Hypothesis: on Ioffe & Szegedy's 784-100x3-10 sigmoid MLP (experiments/bn_paper_mlp.py: 5
epochs at batch 60, SGD, weights from N(0, 0.01)), every normalization with batch statistics in
training trains fast, as BN does (Fig. 1a); LayerNorm and GroupNorm too, the MLP having no
batch dependence to lose; population BN (the running statistics in training, which start at
0/1) and no normalization fall behind even at their own best learning rate; adaptive gradient
clipping does not rescue the unnormalized sigmoid network. The arms of experiments/norm_zoo.py,
with two changes the MLP's 100 units and batch of 60 need: GroupNorm with 20 groups of 5 units,
ghost BN over 3 virtual batches of 20.
Selection: per arm, the SGD learning rate in {0.05, 0.15, 0.5, 1.5, 5} (100x) with seeds 0 and 1,
chosen by mean final validation accuracy (the last 10,000 training examples held out; training
on the first 50,000). Confirmation: each arm at its choice with seeds 10-14, test accuracy,
compared with BN's (Welch, Holm-adjusted).
Command: bnlab sweep experiments/norm_zoo_mlp.py --workdir runs/norm_zoo_mlp &&
  bnlab report runs/norm_zoo_mlp
Runtime: 728 s on the 2-core CPU (100 selection and 50 confirmation trials, vmapped),
2026-12-08.
Expected: normalizations with batch or per-example statistics near BN's 97%+ after 5 epochs;
population BN and none lower, at every learning rate.
"""

from pathlib import Path

from bnlab.config import load_config, load_module

_ZOO = load_module(Path(__file__).with_name("norm_zoo.py"))
VARIANTS = _ZOO.VARIANTS
SMOKE = {"data.train_size": 1200, "data.validation_size": 1200, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.05, 0.15, 0.5, 1.5, 5.0)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
BASELINE = {"model.norm": "batchnorm", "opt.clip": "(default)"}


def get_config():
    c = load_config(Path(__file__).with_name("bn_paper_mlp.py"))
    c.norm.num_groups = 20  # must divide the 100 units
    c.norm.virtual_batch_size = 20  # must divide the batch of 60
    c.data.validation_size = 10_000
    c.train.log_every_steps = 200
    c.checkpoint.every_steps = 0
    return c


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.5,)
    return {_ZOO.arm(norm, extra): [{"model.norm": norm, **extra, "opt.lr": lr} for lr in lrs]
            for norm, extra in VARIANTS}  # fmt: skip


def sweep(chosen, smoke=False):
    for norm, extra in VARIANTS:
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[_ZOO.arm(norm, extra)], "train.seed": seed}

"""Which part of BN does the work, on the Fig. 1 sigmoid MLP, each arm at its own learning rate.

Hypothesis: BN's benefit on Ioffe & Szegedy's 784-100x3-10 sigmoid MLP (experiments/
bn_paper_mlp.py: 5 epochs at batch 60, SGD, weights from N(0, 0.01)) needs normalization by
statistics of the data in training, not the gradient through those statistics (Ioffe &
Szegedy 2015, Sec. 3; `batchnorm_stopgrad`) nor the affine parameters (`batchnorm_noaffine`);
training BN's affine parameters alone, every other weight frozen at its initialization
(Frankle et al. 2021: `opt.trainable=norm`), is far behind; weight normalization (length and
direction apart, no statistics: Salimans & Kingma 2016) and weight standardization with
GroupNorm (Qiao et al. 2019; 20 groups of 5 units) keep part of it; population BN with
statistics computed from the data (over 1,024 training examples, every 100 steps, or before
every step to rule out their staleness) trains nearly as BN does, while no normalization falls
behind.
Selection: per arm, the SGD learning rate in {0.05, 0.15, 0.5, 1.5, 5} (100x) with seeds 0 and
1, chosen by mean final validation accuracy (the last 10,000 training examples held out).
Confirmation: each arm at its choice with seeds 10-14, test accuracy, compared with BN's
(Welch, Holm-adjusted). The reference CNN's arms are for a device run (not run here).
Command: bnlab sweep experiments/bn_mechanisms.py --workdir runs/bn_mechanisms &&
  bnlab report runs/bn_mechanisms --data docs/studies/bn_mechanisms
Runtime: 930 s on the 2-core CPU (90 selection and 45 confirmation trials, vmapped, in two
runs: the every-step arm was added after the first, 502 s + 428 s), 2026-12-08.
Expected: stop-gradient and no-affine BN within a few tenths of BN; BN-only training far
behind; none behind BN by about 2 points (experiments/norm_zoo_mlp.py).
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1200, "data.validation_size": 1200, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.05, 0.15, 0.5, 1.5, 5.0)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
ARMS = {
    "batchnorm": {"model.norm": "batchnorm"},
    "batchnorm_stopgrad": {"model.norm": "batchnorm_stopgrad"},
    "batchnorm_noaffine": {"model.norm": "batchnorm_noaffine"},
    "batchnorm_only_trained": {"model.norm": "batchnorm", "opt.trainable": "norm"},
    "weightnorm": {"model.norm": "weightnorm"},
    "ws_groupnorm": {"model.norm": "ws_groupnorm"},
    "population_batchnorm_data": {"model.norm": "population_batchnorm_data"},
    "population_batchnorm_data_every_step": {
        "model.norm": "population_batchnorm_data",
        "norm.refresh_every": 1,
    },
    "none": {"model.norm": "none"},
}
BASELINE = {
    "model.norm": "batchnorm",
    "opt.trainable": "(default)",
    "norm.refresh_every": "(default)",
}


def get_config():
    c = load_config(Path(__file__).with_name("bn_paper_mlp.py"))
    c.norm.num_groups = 20  # must divide the 100 units
    c.data.validation_size = 10_000
    c.train.log_every_steps = 200
    c.checkpoint.every_steps = 0
    return c


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.5,)
    return {arm: [{**over, "opt.lr": lr} for lr in lrs] for arm, over in ARMS.items()}


def sweep(chosen, smoke=False):
    for arm in ARMS:
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[arm], "train.seed": seed}

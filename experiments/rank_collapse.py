"""Rank collapse with depth at initialization, with and without BN (Daneshmand et al. 2020).

Hypothesis: without normalization, the representations of a deep MLP at initialization align
across inputs: the effective rank of a batch's representation (`rank` diagnostic: the
exponential of the entropy of its normalized singular values) falls with depth towards 1 in a
linear network and a ReLU network alike, while BN keeps it high at every depth (Daneshmand,
Kohler, Lucchi & Hofmann 2020, Thm. 1). Networks whose rank collapsed train slowly or not at
all. MLPs of width 100 with 5, 20 and 50 hidden layers, linear or ReLU, LeCun-normal (linear)
or He-normal (ReLU) init; the rank of every block's output on the first 128 training examples
at step 0 and after training; training for 2 epochs on the first 10,000 training examples
(332 steps of SGD at batch 60).
Selection: per arm (activation x depth x normalization), the learning rate in {0.003, 0.01,
0.03, 0.1, 0.3, 1} with seeds 0 and 1, chosen by mean final validation accuracy (5,000
held-out examples). Confirmation: each arm at its choice with seeds 10-14; test accuracy and
the ranks, BN against none at each activation and depth (Welch, Holm-adjusted).
Command: bnlab sweep experiments/rank_collapse.py --workdir runs/rank_collapse &&
  bnlab report runs/rank_collapse --data docs/studies/rank_collapse
Runtime: 628 s on the 2-core CPU (144 selection and 60 confirmation trials, vmapped),
2026-12-08.
Expected: without BN the last block's rank near 1 at depth 50 and lower with depth; with BN
tens at every depth; the deep unnormalized networks train worse.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "data.validation_size": 1200, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEPTHS = (5, 20, 50)
ACTIVATIONS = {"linear": "lecun_normal", "relu": "he_normal"}
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
BASELINE = {"model.norm": "none"}
DIAG_TABLE = ["rank/block4", "rank/block19", "rank/block49", "rank/head"]


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.opt.name = "sgd"
    c.train.batch_size = 60
    c.train.epochs = 2
    c.data.train_size = 10_000
    c.data.validation_size = 5_000
    c.train.log_every_steps = 166
    c.checkpoint.every_steps = 0
    c.diagnostics.names = "rank"
    c.diagnostics.every_steps = 332  # at initialization and after the last step
    return c


def _arm(activation, depth, norm):
    return {
        "model.activation": activation,
        "model.init": ACTIVATIONS[activation],
        "model.mlp_depth": depth,
        "model.norm": norm,
    }


def _arms():
    norms = ("batchnorm", "none")
    return {f"{act}_{depth}_{norm}": _arm(act, depth, norm)
            for act in ACTIVATIONS for depth in DEPTHS for norm in norms}  # fmt: skip


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.03,)
    return {arm: [{**over, "opt.lr": lr} for lr in lrs] for arm, over in _arms().items()}


def sweep(chosen, smoke=False):
    for arm in _arms():
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[arm], "train.seed": seed}

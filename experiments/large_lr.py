"""BN's advantage at the same learning rate and at each arm's own (Bjorck et al. 2018).

Hypothesis: Bjorck, Gomes, Selman & Weinberger (2018) explain BN's benefit by the larger
learning rates it allows: at the same (small) learning rate, with a full training budget,
BN's advantage vanishes. On the 784-100x3-10 ReLU MLP of experiments/lr_sensitivity.py (SGD,
He-normal init, batch 60), trained for 10 epochs (8,330 steps) on the first 50,000 training
examples: at the same small learning rate BN is indistinguishable from no normalization, and
BN at its own best learning rate is ahead of no normalization at its own.
Selection: per arm (BN, none), the learning rate in {0.003, 0.01, 0.03, 0.1, 0.3, 1, 3}
(1000x) with seeds 0 and 1, chosen by mean final validation accuracy (the last 10,000 training
examples held out). Confirmation with seeds 10-14, test accuracy: each arm at its choice, BN at
none's choice (the same learning rate), and both arms at the small learning rates 0.003 and
0.03 (30x and 10x below none's usual choice, where none trains without trouble); each BN
setting against none at its choice or at the same rate (Welch, Holm-adjusted).
Command: bnlab sweep experiments/large_lr.py --workdir runs/large_lr &&
  bnlab report runs/large_lr --data docs/studies/large_lr
Runtime: 550 s on the 2-core CPU (28 selection and 30 confirmation trials, vmapped, in two
runs: the shared small rates were added after the first), 2026-12-08.
Expected: BN's choice above none's; at the small learning rates BN within a few tenths of none.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1200, "data.validation_size": 1200, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
SMALL_LRS = (0.003, 0.03)  # both arms at each (Bjorck et al.'s same small learning rate)
BASELINE = {"model.norm": "none"}


def get_config():
    c = load_config(Path(__file__).with_name("lr_sensitivity.py"))
    c.train.epochs = 10
    c.data.validation_size = 10_000
    c.train.log_every_steps = 500
    c.checkpoint.every_steps = 0
    return c


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.01, 0.3)
    return {norm: [{"model.norm": norm, "opt.lr": lr} for lr in lrs]
            for norm in ("batchnorm", "none")}  # fmt: skip


def sweep(chosen, smoke=False):
    settings = [chosen["none"], chosen["batchnorm"], {**chosen["batchnorm"], **_lr(chosen["none"])}]
    settings += [
        {"model.norm": norm, "opt.lr": lr} for lr in SMALL_LRS for norm in ("none", "batchnorm")
    ]
    unique = {repr(sorted(s.items())): s for s in settings}.values()
    for setting in unique:
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**setting, "train.seed": seed}


def _lr(overrides):
    return {"opt.lr": overrides["opt.lr"]}

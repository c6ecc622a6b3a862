"""Reduce-on-plateau and early stopping vs fixed schedules, with and without BN.

Hypothesis (the project's seed document): reducing the learning rate when the validation loss
plateaus, and stopping early when it no longer improves, help training. Compared with a step
schedule and cosine decay of the same peak learning rate, reduce-on-plateau should reach a
target validation accuracy no later and end at least as high on test; early stopping should
cost little test accuracy while saving epochs.
Grid: opt.schedule {plateau (x0.3 after 2 epochs without a 0.1% better validation loss),
step (x0.1 at 50% and 75% of training), cosine} x norm {batchnorm, none} x early stopping
{off, patience 5 on the validation loss} x 3 seeds. The 784-100x3-10 ReLU MLP, He init, SGD
momentum 0.9, peak lr 0.05, batch 60, 30 epochs of the first 50,000 training examples (25,000
steps); the last 10,000 are the validation split.
Command: bnlab sweep experiments/plateau.py --workdir runs/plateau && bnlab report runs/plateau
Runtime: 32 minutes on the 2-core CPU while a test suite shared it (12 vmapped programs of 3).
Expected: plateau at least as fast to 98% validation accuracy as step and cosine; final test
accuracies within noise of each other; early stopping ends runs sooner at a small cost.
"""

from bnlab.config import default_config

SMOKE = {"data.validation_size": 600, "data.train_size": 1200, "train.epochs": 3}
SEEDS = range(3)
SCHEDULES = {
    "plateau": {"opt.schedule": "plateau", "opt.decay_rate": 0.3},
    "step": {"opt.schedule": "step", "opt.decay_rate": 0.1},
    "cosine": {"opt.schedule": "cosine"},
}
TARGET = 0.98  # validation accuracy whose first epoch the study reports


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "momentum"
    c.opt.lr = 0.05
    c.opt.momentum = 0.9
    c.opt.plateau_patience = 2
    c.opt.plateau_threshold = 1e-3
    c.train.batch_size = 60
    c.train.epochs = 30
    c.train.log_every_steps = 500
    c.data.validation_size = 10_000
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    for schedule in SCHEDULES.values():
        for norm in ("batchnorm", "none"):
            for patience in (0, 5) if not smoke else (0, 1):
                for seed in SEEDS if not smoke else range(1):
                    yield {
                        **schedule,
                        "model.norm": norm,
                        "train.early_stopping_patience": patience,
                        "train.seed": seed,
                    }

"""Optimizers x BN: does BN help every optimizer, or mostly plain SGD?

Hypothesis: BN speeds up and improves plain SGD the most; adaptive methods (Adam, RMSProp,
AdaGrad), which rescale each coordinate themselves, gain less from it.
Grid: SGD, SGD+momentum 0.9, Adam, RMSProp, AdaGrad, each at two learning rates around its
usual value, x BN/none x 3 seeds; the 784-100x3-10 ReLU MLP, 3 epochs of full MNIST at batch
60 (3,000 steps).
Command: bnlab sweep experiments/optimizers.py --workdir runs/optimizers &&
  bnlab report runs/optimizers
Runtime: 9 minutes (547 s) on the 2-core CPU, shared with other jobs (10 vmapped programs of 6
trials).
Expected: BN ahead for SGD; smaller gaps for the adaptive optimizers.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1}
LRS = {  # two rates around each optimizer's usual one
    "sgd": (0.03, 0.3),
    "momentum": (0.003, 0.03),
    "adam": (3e-4, 3e-3),
    "rmsprop": (3e-4, 3e-3),
    "adagrad": (0.01, 0.1),
}
SEEDS = range(3)


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.momentum = 0.9
    c.train.batch_size = 60
    c.train.epochs = 3
    c.train.log_every_steps = 100
    return c


def sweep(smoke=False):
    for name, lrs in LRS.items():
        for norm in ("batchnorm", "none"):
            for lr in lrs if not smoke else lrs[:1]:
                for seed in SEEDS if not smoke else range(1):
                    yield {"opt.name": name, "model.norm": norm, "opt.lr": lr, "train.seed": seed}

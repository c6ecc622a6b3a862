"""Learning-rate sensitivity: BN tolerates higher learning rates (Ioffe & Szegedy 2015, Sec. 3.3).

Hypothesis: plain SGD on the 784-100x3-10 ReLU MLP works only in a narrow band of learning
rates without BN; with BN the band is wider, reaching rates where the plain network diverges.
Grid: 10 learning rates from 0.001 to 30 (4.5 decades) x BN/none x 5 seeds, 3 epochs of
full MNIST at batch 60 (3,000 steps), He-normal init.
Command: bnlab sweep experiments/lr_sensitivity.py --workdir runs/lr_sensitivity &&
  bnlab report runs/lr_sensitivity
Runtime: 850 s on the 2-core CPU shared with another study's run (two vmapped programs of 50
trials), 2026-12-08.
Expected: accuracy vs lr flat and high over a wider range with BN; no-BN diverging first.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1}
LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
SEEDS = range(5)
BASELINE = {"model.norm": "none"}  # BN against none at each learning rate


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "sgd"
    c.train.batch_size = 60
    c.train.epochs = 3
    c.train.log_every_steps = 100
    return c


def sweep(smoke=False):
    for norm in ("batchnorm", "none"):
        for lr in LRS if not smoke else (0.01, 10.0):
            for seed in SEEDS if not smoke else range(1):
                yield {"model.norm": norm, "opt.lr": lr, "train.seed": seed}

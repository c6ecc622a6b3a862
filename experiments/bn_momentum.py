"""BN momentum x learning rate: do stale running statistics hurt evaluation after short training?

Hypothesis: after 1,000 steps, a BN momentum of 0.999 (a memory of ~1,000 steps, so the initial
0/1 statistics still weigh exp(-1) ~ 37%) evaluates with running statistics that lag the
weights, and its test accuracy falls below that of 0.9 and 0.99; the training loss, which uses
batch statistics, barely depends on the momentum.
Grid: norm.momentum {0.9, 0.99, 0.999} x SGD lr {0.1, 0.5} x 5 seeds; the 784-100x3-10 ReLU
MLP with BN, 1 epoch of full MNIST at batch 60 (1,000 steps).
Command: bnlab sweep experiments/bn_momentum.py --workdir runs/bn_momentum &&
  bnlab report runs/bn_momentum
Runtime: 80 s on the 2-core CPU shared with other runs (one vmapped program of 30 trials),
2026-12-08.
Expected: momentum 0.999 lowest in test accuracy; 0.9 and 0.99 close.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1}  # `--smoke`: 20 steps per trial
MOMENTA = (0.9, 0.99, 0.999)
LRS = (0.1, 0.5)
SEEDS = range(5)
BASELINE = {"norm.momentum": 0.99}  # each momentum against 0.99 at the same lr


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "sgd"
    c.train.batch_size = 60
    c.train.epochs = 1
    c.train.log_every_steps = 100
    return c


def sweep(smoke=False):
    for momentum in MOMENTA if not smoke else (0.9, 0.999):
        for lr in LRS if not smoke else LRS[:1]:
            for seed in SEEDS if not smoke else range(2):
                yield {"norm.momentum": momentum, "opt.lr": lr, "train.seed": seed}

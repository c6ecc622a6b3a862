"""BN as a regularizer, phase 1: choose dropout and weight-decay rates on validation.

Hypothesis (Ioffe & Szegedy 2015, Sec. 3.4): BN regularizes, so that with BN dropout can be
reduced or removed and weight decay lowered. Before comparing BN with these regularizers
(phase 2, `experiments/regularization.py`), this sweep picks each regularizer's rate, per model
and normalization, by the mean final *validation* accuracy: the test split is not looked at.
Grid: model {Fig.-1-size ReLU MLP, reference CNN} x norm {batchnorm, none} x regularizer
{none, dropout 0.1/0.3/0.5, weight decay 1e-5/1e-4/1e-3} x 2 seeds. Small data, so that
regularization matters: 10,000 training examples (the first), the last 10,000 of the
training split held out as validation. MLP: 784-100x3-10 ReLU, He init, SGD momentum 0.9,
lr 0.05 constant, batch 60, 20 epochs (3,320 steps). CNN: the reference CNN of
`mnist_cnn.py` (lr 0.1 cosine, momentum 0.9, BN momentum 0.9), batch 128, 10 epochs (780
steps). Dropout after each hidden block of the MLP and the CNN's dense block; weight decay is
L2 added to the gradient.
Command: bnlab sweep experiments/regularization_select.py --workdir runs/regularization_select
  && bnlab report runs/regularization_select
Runtime: about 35 minutes on the 2-core CPU (the CNN dominates).
Expected: some rate of each regularizer beats none on validation without BN; with BN the
chosen rates are smaller or none.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 600, "data.validation_size": 600, "train.epochs": 1}
SEEDS = range(2)
DROPOUT = (0.1, 0.3, 0.5)
WEIGHT_DECAY = (1e-5, 1e-4, 1e-3)
# The reference CNN's settings (experiments/mnist_cnn.py) over the MLP's base config.
MODELS = {
    "mlp": {"model.name": "mlp"},
    "cnn": {
        "model.name": "cnn",
        "model.init": "lecun_normal",
        "opt.lr": 0.1,
        "opt.schedule": "cosine",
        "norm.momentum": 0.9,
        "train.batch_size": 128,
        "train.epochs": 10,
    },
}


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "momentum"
    c.opt.lr = 0.05
    c.opt.momentum = 0.9
    c.opt.schedule = "constant"
    c.train.batch_size = 60
    c.train.epochs = 20
    c.train.log_every_steps = 100
    c.data.train_size = 10_000
    c.data.validation_size = 10_000
    c.checkpoint.every_steps = 0
    return c


def regularizers(smoke=False):
    """`{}` (none) and each rate of each regularizer, as overrides."""
    yield {}
    for rate in DROPOUT if not smoke else DROPOUT[:1]:
        yield {"model.dropout": rate}
    for wd in WEIGHT_DECAY if not smoke else WEIGHT_DECAY[:1]:
        yield {"opt.weight_decay": wd}


def sweep(smoke=False):
    for settings in MODELS.values():
        for norm in ("batchnorm", "none"):
            for reg in regularizers(smoke):
                for seed in SEEDS if not smoke else range(1):
                    yield {**settings, "model.norm": norm, **reg, "train.seed": seed}

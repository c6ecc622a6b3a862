"""BN against dropout and weight decay: rates chosen per arm on validation, 5 fresh seeds on test.

Hypothesis (Ioffe & Szegedy 2015, Sec. 3.4): BN regularizes: a network with BN generalizes
better than one with weight decay or dropout instead, and with BN these can be reduced or
removed. Selection phase: for each model and normalization, the dropout rate (0.1, 0.3, 0.5)
and the weight-decay rate (1e-5, 1e-4, 1e-3) are chosen separately, each by its mean final
*validation* accuracy over seeds 0 and 1 (`SELECT`; the test split is not read for any choice).
Confirmation: {none, BN} x {no regularizer, dropout, weight decay, both} at the chosen rates,
with seeds 10-14, which selection did not use; test accuracy, the train-test gap (the 10,000
training examples evaluated as test is: running statistics, dropout off) and the curves. Small
data, so that regularization matters: 10,000 training examples (the first), the last 10,000 of
the training split held out as validation. MLP: 784-100x3-10 ReLU, He init, SGD momentum 0.9,
lr 0.05 constant, batch 60, 20 epochs (3,320 steps). CNN: the reference CNN of `mnist_cnn.py`
(lr 0.1 cosine, momentum 0.9, BN momentum 0.9), batch 128, 10 epochs (780 steps). Dropout after
each hidden block of the MLP and the CNN's dense block; weight decay is L2 added to the
gradient.
Command: bnlab sweep experiments/regularization.py --workdir runs/regularization
  && bnlab report runs/regularization
Runtime: about 95 minutes on the 2-core CPU (selection 35, confirmation 60; the CNN dominates).
Expected: BN alone at least as good on test as either regularizer alone without BN; adding
dropout or weight decay to BN changes test accuracy within noise.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 600, "data.validation_size": 600, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
RATES = {"model.dropout": (0.1, 0.3, 0.5), "opt.weight_decay": (1e-5, 1e-4, 1e-3)}
NORMS = ("batchnorm", "none")
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
    c.data.train_eval_size = 10_000  # the gap in evaluation mode: running statistics, no dropout
    c.checkpoint.every_steps = 0
    return c


def arms():
    """(arm name, model, norm, regularizer key) for each rate to choose."""
    for model in MODELS:
        for norm in NORMS:
            for key in RATES:
                yield f"{model}/{norm}/{key.rsplit('.', 1)[-1]}", model, norm, key


def candidates(smoke=False):
    return {
        name: [
            {**MODELS[model], "model.norm": norm, key: rate}
            for rate in (RATES[key] if not smoke else RATES[key][:1])
        ]
        for name, model, norm, key in arms()
    }


def sweep(chosen, smoke=False):
    for model, settings in MODELS.items():
        for norm in NORMS:
            dropout = {"model.dropout": chosen[f"{model}/{norm}/dropout"]["model.dropout"]}
            decay = chosen[f"{model}/{norm}/weight_decay"]["opt.weight_decay"]
            decay = {"opt.weight_decay": decay}
            for reg in ({}, dropout, decay, {**dropout, **decay}):
                for seed in SEEDS if not smoke else SEEDS[:1]:
                    yield {**settings, "model.norm": norm, **reg, "train.seed": seed}

"""BN against dropout and weight decay, phase 2: the rates chosen on validation, 5 new seeds.

Hypothesis (Ioffe & Szegedy 2015, Sec. 3.4): BN regularizes: a network with BN generalizes
better than one with weight decay or dropout instead, and with BN these can be reduced or
removed. Phase 1 (`experiments/regularization_select.py`) chose each regularizer's rate per
model and normalization by the mean final validation accuracy over 2 seeds (the test split was
not looked at); this sweep trains {none, BN} x {no regularizer, dropout, weight decay, both}
at those rates with 5 seeds that phase 1 did not use (10-14), and reports test accuracy, the
train-test gap and the curves. Same setups as phase 1: 10,000 training examples, the last
10,000 of the training split as validation; the Fig.-1-size ReLU MLP (lr 0.05 constant, batch
60, 20 epochs) and the reference CNN (lr 0.1 cosine, batch 128, 10 epochs).
Command: bnlab sweep experiments/regularization.py --workdir runs/regularization
  && bnlab report runs/regularization
Runtime: 60 minutes on the 2-core CPU (the CNN dominates; the MLP trials come first).
Expected: BN alone at least as good on test as either regularizer alone without BN; adding
dropout or weight decay to BN changes test accuracy within noise.
"""

from pathlib import Path

from bnlab.config import load_module

phase1 = load_module(Path(__file__).with_name("regularization_select.py"))

SMOKE = phase1.SMOKE
SEEDS = range(10, 15)
# Phase 1's choices, by mean final validation accuracy (docs/studies/regularization_select).
CHOSEN = {
    ("mlp", "batchnorm"): {"model.dropout": 0.1, "opt.weight_decay": 1e-4},
    ("mlp", "none"): {"model.dropout": 0.1, "opt.weight_decay": 1e-5},
    ("cnn", "batchnorm"): {"model.dropout": 0.5, "opt.weight_decay": 1e-3},
    ("cnn", "none"): {"model.dropout": 0.1, "opt.weight_decay": 1e-5},
}
get_config = phase1.get_config


def regularizers(chosen: dict) -> dict[str, dict]:
    dropout = {"model.dropout": chosen["model.dropout"]}
    decay = {"opt.weight_decay": chosen["opt.weight_decay"]}
    return {"none": {}, "dropout": dropout, "weight_decay": decay, "both": {**dropout, **decay}}


def sweep(smoke=False):
    for model, settings in phase1.MODELS.items():
        for norm in ("batchnorm", "none"):
            for reg in regularizers(CHOSEN[model, norm]).values():
                for seed in SEEDS if not smoke else SEEDS[:1]:
                    yield {**settings, "model.norm": norm, **reg, "train.seed": seed}

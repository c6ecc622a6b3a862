"""Ioffe & Szegedy (2015) Fig. 1 MLP on MNIST.

Hypothesis: the 784-100-100-100-10 sigmoid MLP, small Gaussian init, batch 60, trains faster
and reaches higher test accuracy with BN before each sigmoid than without.
Command: bnlab train [--smoke] --config experiments/bn_paper_mlp.py --workdir runs/bn_paper_mlp
  (add --config.model.norm=none for the baseline; the paper runs 50,000 steps = 50 epochs)
Runtime: a few seconds per epoch on a 2-core CPU.
Expected: BN ahead of no-BN in test accuracy early in training.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1}  # `--smoke`: a quick check of the whole path


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.norm = "batchnorm"
    c.model.activation = "sigmoid"
    c.model.placement = "before"
    c.model.init = "normal"  # "small random Gaussian values"
    c.model.init_std = 0.01
    c.opt.name = "sgd"
    c.opt.lr = 0.5
    c.train.batch_size = 60
    c.train.epochs = 5
    c.train.log_every_steps = 100
    return c

"""Ioffe & Szegedy (2015), Figure 1, on MNIST: BN vs none in the 784-100x3-10 sigmoid MLP.

Hypothesis: with BN before every sigmoid the network reaches a higher test accuracy sooner
(Fig. 1a), and the input to a sigmoid of the last hidden layer keeps a stable distribution
over training, while without BN its 15th/50th/85th percentiles drift (Fig. 1b,c).
Setup as in the paper: batch 60, 50,000 SGD steps (50 epochs), weights from a small Gaussian
(std 0.01), lr 0.5; test accuracy and the percentiles of one sigmoid's input (unit 0 of the
last hidden layer, over the 10,000 test images) after every epoch; 5 seeds per arm.
Command: bnlab sweep experiments/bn_paper_fig1.py --workdir runs/bn_paper_fig1 &&
  bnlab report runs/bn_paper_fig1 --data docs/studies/bn_paper_fig1
Runtime: 430 s on the 2-core CPU, nothing else running (two vmapped programs of 5 seeds each;
2026-12-08, the re-run that committed the data: every test accuracy equal to the first run's).
Expected: BN ahead early and at the end; no-BN percentiles moving, BN percentiles steady.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 2}  # `--smoke`: 40 steps per trial
SEEDS = range(5)
BASELINE = {"model.norm": "none"}  # BN against no normalization (Welch, 5 seeds each)


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
    c.train.epochs = 50  # 60,000 / 60 = 1,000 steps per epoch: 50,000 steps
    c.train.log_every_steps = 500
    c.train.probe_unit = 0  # one sigmoid of the last hidden layer
    return c


def sweep(smoke=False):
    for norm in ("batchnorm", "none"):
        for seed in SEEDS if not smoke else range(2):
            yield {"model.norm": norm, "train.seed": seed}

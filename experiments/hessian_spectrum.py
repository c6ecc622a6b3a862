"""The Hessian's spectrum with and without BN (Ghorbani, Krishnan & Xiao 2019).

Hypothesis (Ghorbani et al. 2019, "An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density"): without BN the training loss's Hessian has a few large outlier
eigenvalues, isolated from the bulk, that slow optimization; BN removes them; they come back
when BN normalizes with population (running) statistics in training instead of the batch's.
Setup: the 784-100x3-10 ReLU MLP (He init), SGD momentum 0.9, lr 0.05, batch 60, 5 epochs of
MNIST (5,000 steps); norm {batchnorm, none, population_batchnorm} x 3 seeds. Diagnostic
`hessian` every 500 steps, from initialization to the end, on a fixed batch of 512 training
examples, in training mode (batch statistics; population BN's own running statistics): the 5
largest eigenvalues (Lanczos, 30 iterations) and the spectral density by stochastic Lanczos
quadrature (2 probes).
Command: bnlab sweep experiments/hessian_spectrum.py --workdir runs/hessian_spectrum &&
  bnlab report runs/hessian_spectrum
Runtime: 210 s on the 2-core CPU shared with another study's run (3 vmapped programs of 3
seeds), 2026-12-08.
Expected: lambda_max and the gap between the top eigenvalues and the bulk far larger without
BN than with it, and population BN closer to none than to BN.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1, "diagnostics.every_steps": 10}
SEEDS = range(3)
BASELINE = {"model.norm": "batchnorm"}


def get_config():
    c = load_config(Path(__file__).with_name("bn_paper_mlp.py"))
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "momentum"
    c.opt.lr = 0.05
    c.opt.momentum = 0.9
    c.diagnostics.names = "hessian"
    c.diagnostics.every_steps = 500
    c.diagnostics.batch_size = 512
    c.diagnostics.hessian_num_iters = 30
    c.diagnostics.hessian_top_k = 5
    c.train.log_every_steps = 250
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    for norm in ("batchnorm", "none", "population_batchnorm"):
        for seed in SEEDS if not smoke else range(1):
            yield {"model.norm": norm, "train.seed": seed}

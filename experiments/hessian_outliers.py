"""Hessian outliers over the data, with and without BN (Ghorbani, Krishnan & Xiao 2019).

Hypothesis: Ghorbani et al. find that without BN the Hessian of the training loss over the
data has large eigenvalues isolated from the bulk, that BN removes them, and that they return
when BN normalizes with population statistics instead of the batch's. experiments/
hessian_spectrum.py measured one 512-example batch with 2 probes of 30 Lanczos steps and saw
the top eigenvalue alone; here `hessian_data` measures the mean training loss over 80 batches
of 128 (10,240 examples, each batch normalized with its own statistics), 4 probes of 90
Lanczos steps: the top 10 eigenvalues, the bulk's edge, the number of resolved eigenvalues
above it (outliers), the gradient's share in the top-10 eigenspace, and lr * lambda_max / 2.
Population BN takes its statistics from the data (`population_batchnorm_data`: recomputed
every 100 steps over 1,024 training examples), so it is not confounded with stale statistics.
Setup: the 784-100x3-10 ReLU MLP of hessian_spectrum (He init, SGD momentum 0.9, batch 60),
2 epochs (1,666 steps) on the first 50,000 training examples; measured at steps 0, 833, 1666.
Selection: per arm, the learning rate in {0.005, 0.015, 0.05, 0.15, 0.5} with seeds 0 and 1
(no diagnostics), chosen by mean final validation accuracy (the last 10,000 training examples
held out). Confirmation: each arm at its choice with seeds 10-14, with the diagnostic; each
arm against BN (Welch, Holm-adjusted), at the same steps and at matched training loss.
Command: bnlab sweep experiments/hessian_outliers.py --workdir runs/hessian_outliers &&
  bnlab report runs/hessian_outliers --data docs/studies/hessian_outliers
Runtime: about 43 min on the 2-core CPU, shared with other studies (30 selection trials
without the diagnostic, then 3 vmapped groups of 5 with it, about 4.5 min per measurement of 5
trials; the population arm ran again after a fix to its step-0 measurement), 2026-12-08.
Expected: more outliers and a larger lambda_max without BN and with population BN than with BN.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {
    "data.train_size": 1200,
    "data.validation_size": 1200,
    "train.epochs": 1,
    "diagnostics.batch_size": 256,
    "diagnostics.every_steps": 10,
    "diagnostics.hessian_data_num_iters": 20,
    "diagnostics.hessian_data_top_k": 5,
}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.005, 0.015, 0.05, 0.15, 0.5)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
NORMS = ("batchnorm", "none", "population_batchnorm_data")
BASELINE = {"model.norm": "batchnorm"}
DIAG_TABLE = [
    "hessian_data/lambda_max",
    "hessian_data/bulk_edge",
    "hessian_data/outliers",
    "hessian_data/gradient_fraction",
    "hessian_data/edge_of_stability",
    "hessian_data/loss",
]
DIAG_MATCH = "hessian_data/loss"


def get_config():
    c = load_config(Path(__file__).with_name("hessian_spectrum.py"))
    c.train.epochs = 2
    c.data.validation_size = 10_000
    c.diagnostics.names = ""  # selection trains without it; the confirmation measures
    c.diagnostics.every_steps = 833
    c.diagnostics.batch_size = 10_240
    return c


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.05,)
    return {norm: [{"model.norm": norm, "opt.lr": lr} for lr in lrs] for norm in NORMS}


def sweep(chosen, smoke=False):
    for norm in NORMS:
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[norm], "diagnostics.names": "hessian_data", "train.seed": seed}

"""Scale invariance: BN's effective learning rate lr / ||W||^2, with and without weight decay.

Hypothesis: a kernel that feeds BN can be rescaled without changing the network's function,
so its gradient shrinks as 1/||W|| and a step moves its direction as a step of lr/||W||^2
would on the unit sphere (van Laarhoven 2017; Hoffer et al. 2018; Arora et al. 2019). Without
weight decay ||W|| grows during training and the effective learning rate falls by itself, a
schedule that a run without BN does not have; weight decay holds ||W|| in check and the
effective rate level (Zhang et al. 2019). In scale-invariant units (the Hessian of the loss in
coordinates scaled by each such kernel's norm, `hessian_units=scale_invariant`) the top
eigenvalue of a BN network stops falling over training.
On the 784-100x3-10 ReLU MLP of experiments/lr_sensitivity.py (SGD at a constant learning
rate, He-normal init, batch 60, 3 epochs on the first 50,000 training examples): BN, BN with
weight decay 5e-4 (L2 added to the gradient), no normalization. Logged every 500 steps on the
first 512 training examples: each kernel's norm and effective learning rate (`weight_norms`),
the Hessian's top eigenvalue in raw units (`hessian`, 20 Lanczos steps) and in scale-invariant
units (`hessian_data` over the same 512 examples as one batch, 20 steps).
Selection: per arm, the learning rate in {0.01, 0.03, 0.1, 0.3, 1} with seeds 0 and 1, chosen by
mean final validation accuracy (the last 10,000 training examples held out). Confirmation:
each arm at its choice with seeds 10-14; test accuracy and the diagnostics, each arm against
BN (Welch, Holm-adjusted). The reference CNN's arms are for a device run (not run here).
Command: bnlab sweep experiments/effective_lr.py --workdir runs/effective_lr &&
  bnlab report runs/effective_lr --data docs/studies/effective_lr
Runtime: 277 s on the 2-core CPU (30 selection and 15 confirmation trials, vmapped),
2026-12-08.
Expected: BN's kernel norms grow and its effective learning rate falls several-fold; with
weight decay both stay near their initial values; without BN nothing is scale-invariant.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1200, "data.validation_size": 1200, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
ARMS = {
    "batchnorm": {"model.norm": "batchnorm"},
    "batchnorm_weight_decay": {"model.norm": "batchnorm", "opt.weight_decay": 5e-4},
    "none": {"model.norm": "none"},
}
BASELINE = {"model.norm": "batchnorm", "opt.weight_decay": "(default)"}
DIAG_TABLE = [
    "weight_norms/dense*/weight_norm",
    "weight_norms/dense*/effective_lr",
    "hessian/lambda_max",
    "hessian_data/lambda_max",
]


def get_config():
    c = load_config(Path(__file__).with_name("lr_sensitivity.py"))
    c.data.validation_size = 10_000
    c.train.log_every_steps = 250
    c.checkpoint.every_steps = 0
    d = c.diagnostics
    d.names = "weight_norms,hessian,hessian_data"
    d.every_steps = 500
    d.batch_size = 512
    d.hessian_num_iters = 20
    d.hessian_top_k = 1
    d.hessian_num_probes = 1
    d.hessian_data_batch_size = 512
    d.hessian_data_num_iters = 20
    d.hessian_data_top_k = 1
    d.hessian_data_num_probes = 1
    d.hessian_data_units = "scale_invariant"
    return c


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.1,)
    return {arm: [{**over, "opt.lr": lr} for lr in lrs] for arm, over in ARMS.items()}


def sweep(chosen, smoke=False):
    for arm in ARMS:
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[arm], "train.seed": seed}

"""Does BN reduce internal covariate shift, or smooth the landscape? (Santurkar et al. 2018)

Hypothesis (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help
Optimization?"): BN does not reduce internal covariate shift (ICS) in their Definition 2.1 (the
change of a layer's gradient when the layers before it take their update), and may increase
it; noisy BN, which injects covariate shift on purpose, trains about as well as BN; what BN
changes is the landscape: the loss varies less, and the gradient predicts itself better
(smaller gradient predictiveness and effective beta-smoothness), along the gradient direction.
Grid: model {the Fig. 1 sigmoid MLP (5 epochs at batch 60, lr 0.5, N(0, 0.01) init), the
reference CNN (2 epochs at batch 128, lr 0.1 cosine)} x norm {batchnorm, none,
noisy_batchnorm (noise means U(-0.5, 0.5), standard deviations U(0, 1), redrawn every step)}
x 3 seeds. Diagnostics `ics` (l2 distance and cosine of G and G' per weight layer) and
`landscape` (step sizes 0.5x to 4x the learning rate along the gradient) on a fixed batch of
128 training examples, every 250 steps (MLP, 5,000 steps) or every 100 steps (CNN, 936 steps).
Command: bnlab sweep experiments/santurkar_ics.py --workdir runs/santurkar_ics &&
  bnlab report runs/santurkar_ics
Runtime: 25 minutes on the 2-core CPU shared with other jobs (6 vmapped programs of 3).
Expected: ICS (l2) with BN not below none; cos(G, G') not higher with BN; noisy BN training
close to BN; loss range, gradient predictiveness and beta-smoothness lower with BN.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1, "diagnostics.every_steps": 10}
SEEDS = range(3)
MODELS = {
    "mlp": {"model.name": "mlp", "diagnostics.every_steps": 250},
    "cnn": {
        "model.name": "cnn",
        "model.activation": "relu",
        "model.init": "lecun_normal",
        "opt.name": "momentum",
        "opt.lr": 0.1,
        "opt.schedule": "cosine",
        "norm.momentum": 0.9,
        "train.batch_size": 128,
        "train.epochs": 2,
        "diagnostics.every_steps": 100,
    },
}


def get_config():
    c = load_config(Path(__file__).with_name("bn_paper_mlp.py"))
    c.diagnostics.names = "ics,landscape"
    c.diagnostics.batch_size = 128
    c.train.log_every_steps = 100
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    for settings in MODELS.values():
        for norm in ("batchnorm", "none", "noisy_batchnorm"):
            for seed in SEEDS if not smoke else range(1):
                point = {**settings, "model.norm": norm, "train.seed": seed}
                if smoke:
                    point.pop("diagnostics.every_steps")
                yield point

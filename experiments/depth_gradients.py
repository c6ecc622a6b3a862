"""Gradients at initialization vs depth, with and without BN (Yang et al. 2019).

Hypothesis (Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, "A Mean Field Theory of
Batch Normalization"): in a fully connected network with BN, the gradients at initialization
explode exponentially with depth: the first layer's weight-gradient norm grows like
lambda^depth, lambda > 1 (for ReLU about sqrt(pi / (pi - 1)) ~ 1.21 per layer in their
large-batch mean-field limit), whatever the activation, at a rate that depends on the batch
size and tends to 1 as the network nears the linear regime; without BN, with a
variance-preserving init, it stays roughly flat for linear and ReLU networks.
Grid: activation {relu (He init), linear (LeCun init), sigmoid (LeCun init)} x diagnostic batch
{16, 512} x 5 seeds; each trial measures `init_gradients` at step 0: MLPs of width 100 and 2 to
25 weight layers, each with BN before every nonlinearity and without normalization, the
per-layer gradient norms of the cross-entropy on the first 16 or 512 MNIST training images
(training mode: batch statistics). The runs train only 10 steps (nothing else is measured).
Command: bnlab sweep experiments/depth_gradients.py --workdir runs/depth_gradients &&
  bnlab report runs/depth_gradients
Runtime: 27 minutes on the 2-core CPU shared with other jobs (mostly compiling 48 MLPs per
setting).
Expected: with BN, log ||dL/dW_1|| rising linearly in depth (the slope is log lambda), steeper
at batch 512 than at 16; without BN, flat for linear and ReLU, falling for sigmoid.
"""

from bnlab.config import default_config

SMOKE = {"diagnostics.init_gradients_max_depth": 4}
SEEDS = range(5)
ACTIVATIONS = {
    "relu": {"model.activation": "relu", "model.init": "he_normal"},
    "linear": {"model.activation": "linear", "model.init": "lecun_normal"},
    "sigmoid": {"model.activation": "sigmoid", "model.init": "lecun_normal"},
}


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.opt.name = "sgd"
    c.opt.lr = 0.01
    c.train.batch_size = 60
    c.train.epochs = 1
    c.data.train_size = 600
    c.checkpoint.every_steps = 0
    c.diagnostics.names = "init_gradients"
    c.diagnostics.every_steps = 10
    c.diagnostics.init_gradients_max_depth = 25
    return c


def sweep(smoke=False):
    for activation in ACTIVATIONS.values():
        for batch in (16, 512):
            for seed in SEEDS if not smoke else range(2):
                yield {**activation, "diagnostics.batch_size": batch, "train.seed": seed}

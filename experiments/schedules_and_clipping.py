"""Learning-rate schedules x gradient clipping, BN vs none.

Hypothesis: decaying schedules beat a constant rate at the end of training; global-norm
clipping rescues learning rates that diverge without it, more so without BN (whose plain
network diverges first); BN makes the choice of schedule matter less.
Grid: constant / step (x0.1 at 50% and 75%) / exponential (x0.01 over the run) / cosine
x no clipping / global-norm clipping at 1.0 x BN/none x lr {0.1, 1, 10} x 2 seeds; the
784-100x3-10 ReLU MLP, SGD, 3 epochs of full MNIST at batch 60 (3,000 steps).
Command: bnlab sweep experiments/schedules_and_clipping.py --workdir runs/schedules_and_clipping
  && bnlab report runs/schedules_and_clipping
Runtime: 92 s on one H200 GPU (16 vmapped programs of 6 trials); on the 2-core CPU, shared
with other jobs, 2 of the 16 programs took 10 minutes (about 80 minutes in all).
Expected: lr 10 diverges without clipping (no BN at least); clipping keeps it finite.
"""

from bnlab.config import default_config

SMOKE = {"data.train_size": 1200, "train.epochs": 1}
SCHEDULES = ("constant", "step", "exponential", "cosine")
CLIPS = ("none", "global_norm")
LRS = (0.1, 1.0, 10.0)
SEEDS = range(2)


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "relu"
    c.model.init = "he_normal"
    c.opt.name = "sgd"
    c.opt.decay_rate = 0.1  # step: x0.1 per boundary; exponential: overwritten below
    c.opt.clip_value = 1.0
    c.train.batch_size = 60
    c.train.epochs = 3
    c.train.log_every_steps = 100
    return c


def sweep(smoke=False):
    for schedule in SCHEDULES if not smoke else ("constant", "cosine"):
        for clip in CLIPS:
            for norm in ("batchnorm", "none"):
                for lr in LRS if not smoke else (10.0,):
                    for seed in SEEDS if not smoke else range(1):
                        point = {"opt.schedule": schedule, "opt.clip": clip, "model.norm": norm}
                        point |= {"opt.lr": lr, "train.seed": seed}
                        if schedule == "exponential":
                            point["opt.decay_rate"] = 0.01
                        yield point

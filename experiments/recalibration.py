"""Do stale or biased running statistics explain BN's losses? Recalibrated against running.

Hypothesis: three studies explain a loss of BN by its running statistics: `seed_cnn_binary`
(93 steps at momentum 0.99 leave 0.99^93 = 39% of the weight on the initial 0/1 statistics),
`bn_momentum` (a momentum of 0.999) and `small_batch` (BN at 2 examples per step averages
biased per-batch variances). If so, re-estimating the statistics on the trained weights
(`bnlab evaluate WORKDIR --recalibrate 10000`: the exact mean and variance of each BN layer's
inputs over the first 10,000 training examples, layer by layer) recovers that accuracy.
Two groups of the reference CNN with BN (experiments/mnist_cnn.py), each trial evaluated with
its running statistics and again recalibrated, on the same weights (a paired comparison):
- seed_cnn_binary's regime: 10 classes, one epoch over the first 12,000 training images at
  batch 128 (93 steps), plain SGD at lr 0.003, 0.03 and 0.3, BN momentum 0.99;
- small_batch's regime: one epoch over the first 30,000 images at per-step batch 2, 8 and 128,
  lr 0.1 x B / 128 with cosine decay, SGD momentum 0.9, BN momentum 0.9^(B/128)
  (experiments/small_batch.py's `at_batch`).
5 seeds each. bn_momentum's MLP trials were recalibrated the same way (its report).
No setting differs between compared arms: each trial is its own control.
Command: bnlab sweep experiments/recalibration.py --workdir runs/recalibration &&
  for d in runs/recalibration/runs/*/; do bnlab evaluate $d --recalibrate 10000; done &&
  bnlab report runs/recalibration --data docs/studies/recalibration
Runtime: 1012 s for the 30 trials (vmapped by seed; the batch-2 trials' 15,000 steps dominate)
and 283 s for the 30 recalibrations (one process each), on the 2-core CPU shared with another
study, 2026-12-08.
Expected: a large gain after 93 steps at momentum 0.99 at every learning rate; a gain at batch 2
if its statistics are biased; none at batch 128.
"""

from pathlib import Path

from bnlab.config import load_config, load_module

SMOKE = {"data.train_size": 256, "train.eval_batch_size": 500}
SEEDS = range(5)
LRS = (0.003, 0.03, 0.3)  # seed_cnn_binary's
BATCHES = (2, 8, 128)
_SMALL = load_module(Path(__file__).with_name("small_batch.py"))


def get_config():
    c = load_config(Path(__file__).with_name("mnist_cnn.py"))
    c.train.epochs = 1
    c.train.log_every_steps = 50
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    stale, small = (256, 256) if smoke else (12_000, _SMALL.EXAMPLES)
    for lr in LRS:
        for seed in SEEDS if not smoke else range(2):
            yield {"data.train_size": stale, "train.batch_size": 128, "opt.name": "sgd",
                   "opt.schedule": "constant", "opt.lr": lr, "norm.momentum": 0.99,
                   "train.seed": seed}  # fmt: skip
    for batch in BATCHES if not smoke else (8, 128):
        for seed in SEEDS if not smoke else range(2):
            at = _SMALL.at_batch(batch, small)
            at = {k: v for k, v in at.items() if k.startswith(("train.", "opt.", "norm.mom"))}
            yield {"data.train_size": small, **at, "train.seed": seed}

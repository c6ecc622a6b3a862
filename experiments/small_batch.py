"""Small minibatches: batch renorm (Ioffe 2017) and GroupNorm (Wu & He 2018) against BN.

Hypothesis, two claims: (Ioffe 2017) batch renormalization recovers most of what BN loses
when the minibatch is small; (Wu & He 2018) GroupNorm's accuracy does not depend on the batch
size, while BN's falls at small batches.
Setup: the reference CNN (experiments/mnist_cnn.py), per-step batch B in {2, 4, 8, 16, 32,
128}, every run seeing the same 30,000 examples once (the first 30,000 of the training split;
30,000 / B steps). Learning rate scaled linearly with the batch (Goyal et al. 2017): 0.1 x
B / 128, cosine decay, SGD momentum 0.9. BN's running statistics keep the same memory in
examples at every batch size: momentum 0.9^(B/128) per step (so evaluation does not suffer
from running statistics averaged over a handful of examples, a separate effect). Batch renorm's
schedule is scaled to each run's steps as the paper's is to its own: plain BN for the first
4%, r_max rising to 3 over the next 30%, d_max to 5 over the next 20%. Normalizations:
batchnorm, batch_renorm, groupnorm (32 groups), layernorm, none; and ghost_batchnorm at batch
128 with virtual batches of 2, 4, 8, 16 and 32 examples: BN statistics of a small batch with
the gradient of a large one. 3 seeds each.
Command: bnlab sweep experiments/small_batch.py --workdir runs/small_batch &&
  bnlab report runs/small_batch
Runtime: about an hour on the 2-core CPU (the 15,000 steps at batch 2 dominate).
Expected: BN falls at B <= 4 and batch renorm less; GroupNorm and LayerNorm flat in B; ghost
BN at batch 128 falling with the virtual batch as BN does with the batch.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 256, "train.eval_batch_size": 500}
SEEDS = range(3)
BATCHES = (2, 4, 8, 16, 32, 128)
NORMS = ("batchnorm", "batch_renorm", "groupnorm", "layernorm", "none")
VIRTUAL = (2, 4, 8, 16, 32)
EXAMPLES = 30_000


def get_config():
    c = load_config(Path(__file__).with_name("mnist_cnn.py"))
    c.data.train_size = EXAMPLES
    c.train.epochs = 1
    c.train.log_every_steps = 50
    c.checkpoint.every_steps = 0
    return c


def at_batch(batch: int, examples: int = EXAMPLES) -> dict:
    """The overrides that scale a run to per-step batch `batch` (see the docstring)."""
    steps = examples // batch
    return {
        "train.batch_size": batch,
        "opt.lr": round(0.1 * batch / 128, 6),
        "norm.momentum": round(0.9 ** (batch / 128), 6),
        "norm.renorm_warmup_steps": int(0.04 * steps),
        "norm.r_max_steps": max(int(0.30 * steps), 1),
        "norm.d_max_steps": max(int(0.20 * steps), 1),
    }


def sweep(smoke=False):
    examples = 256 if smoke else EXAMPLES
    for norm in NORMS:
        for batch in BATCHES if not smoke else (2, 128):
            for seed in SEEDS if not smoke else range(1):
                yield {"model.norm": norm, **at_batch(batch, examples), "train.seed": seed}
    for virtual in VIRTUAL if not smoke else (2,):
        for seed in SEEDS if not smoke else range(1):
            yield {
                "model.norm": "ghost_batchnorm",
                "norm.virtual_batch_size": virtual,
                **at_batch(128, examples),
                "train.seed": seed,
            }

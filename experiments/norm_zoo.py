"""Normalizations of the registry on the reference CNN, each at its own learning rate.

Hypothesis: on the reference CNN (experiments/mnist_cnn.py: 2 epochs of MNIST at batch 128, SGD
momentum 0.9, cosine decay), with each arm's learning rate chosen on validation, the BN
variants that keep batch statistics in training (batch renorm) match plain BN; the
batch-independent normalizations (LayerNorm, GroupNorm with 32 groups) come close; no
normalization is below BN. The registry's other variants (ghost BN over virtual batches of 32,
BN without gamma/beta, Santurkar et al.'s noisy BN, population BN, no normalization with
adaptive gradient clipping) are arms of experiments/norm_zoo_mlp.py; on the CNN they were cut
to fit the 2-core CPU (`CPU_ARMS`; `ALL_ARMS` for a GPU).
Selection: per arm, lr in {0.01, 0.03, 0.1, 0.3, 1.0} (100x) with seeds 0 and 1, chosen by mean
final validation accuracy (the last 10,000 training examples held out; training on the first
50,000). Confirmation: each arm at its choice with seeds 10-14, test accuracy, compared with
BN's (Welch, Holm-adjusted).
Command: bnlab sweep experiments/norm_zoo.py --workdir runs/norm_zoo &&
  bnlab report runs/norm_zoo
Runtime: 74 min on the 2-core CPU shared with test runs (`--engine sequential`; 45 trials, the
other 30, BN's and none's, copied from experiments/reference_cnn.py's identical trials).
Expected: batch renorm within 0.1 point of BN; LayerNorm/GroupNorm within 0.3 points of BN;
none below.
"""

from pathlib import Path

from bnlab.config import load_module

SMOKE = {"data.train_size": 1280, "data.validation_size": 1280, "train.epochs": 1}
SELECT = {"split": "validation", "metric": "accuracy", "seeds": [0, 1]}
LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
SEEDS = range(10, 15)  # the confirmation's: fresh, selection used 0 and 1
BASELINE = {"model.norm": "batchnorm", "opt.clip": "(default)"}
# (model.norm, extra overrides): the registry's variants, then no normalization with
# adaptive gradient clipping (the normalizer-free networks' substitute, Brock et al. 2021).
VARIANTS = (
    ("batchnorm", {}),
    ("ghost_batchnorm", {}),
    ("batch_renorm", {}),
    ("batchnorm_noaffine", {}),
    ("noisy_batchnorm", {}),
    ("population_batchnorm", {}),
    ("layernorm", {}),
    ("groupnorm", {}),
    ("none", {}),
    ("none", {"opt.clip": "adaptive", "opt.clip_value": 0.16}),
)
ALL_ARMS = tuple(range(len(VARIANTS)))
CPU_ARMS = (0, 2, 6, 7, 8)  # BN, batch renorm, LayerNorm, GroupNorm, none: what verdicts rest on
ARMS = CPU_ARMS
# BN's momentum as experiments/reference_cnn.py chose it on validation (its selection.json).
BN_MOMENTUM = 0.9


def arm(norm, extra):
    """An arm's name: the normalization, `+adaptive_clip` for none with clipping."""
    return norm + ("+adaptive_clip" if extra.get("opt.clip") == "adaptive" else "")


# reference_cnn's config, so that BN's and none's trials are the same trials in both studies.
get_config = load_module(Path(__file__).with_name("reference_cnn.py")).get_config


def candidates(smoke=False):
    lrs = LRS if not smoke else (0.1,)
    return {arm(norm, extra): [{"model.norm": norm, **extra, **_momentum(norm), "opt.lr": lr}
                               for lr in lrs]
            for norm, extra in (VARIANTS[i] for i in ARMS)}  # fmt: skip


def _momentum(norm):
    """BN's momentum, for the normalizations that keep running statistics: stated in the
    overrides, so that BN's and no normalization's trials are those of reference_cnn.py."""
    return {} if norm in ("layernorm", "groupnorm", "none") else {"norm.momentum": BN_MOMENTUM}


def sweep(chosen, smoke=False):
    for norm, extra in (VARIANTS[i] for i in ARMS):
        for seed in SEEDS if not smoke else SEEDS[:1]:
            yield {**chosen[arm(norm, extra)], "train.seed": seed}

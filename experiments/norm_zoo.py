"""Every normalization of the registry on the reference CNN (and none + adaptive clipping).

Hypothesis: at the reference CNN's default settings (experiments/mnist_cnn.py: 2 epochs of
MNIST at batch 128, SGD momentum 0.9, lr 0.1 cosine, BN momentum 0.9), the BN variants that
keep batch statistics in training (ghost BN over virtual batches of 32, batch renorm, BN
without gamma/beta) match plain BN; the batch-independent normalizations (LayerNorm, GroupNorm
with 32 groups) come close; noisy BN (Santurkar et al.'s injected non-zero-mean,
non-unit-variance noise, noise_mean 0.5, noise_std 1.0) still trains despite the covariate
shift it injects; BN with population statistics in training (Ghorbani et al.'s ablation)
loses most of BN's benefit; no normalization, with or without adaptive gradient clipping
(Brock et al. 2021, unit-wise ratio 0.16), is below BN.
Grid: 10 normalization settings x 5 seeds; test accuracy after every epoch and at the end.
The Fig. 1 MLP is the same study on the sigmoid MLP: experiments/norm_zoo_mlp.py.
Command: bnlab sweep experiments/norm_zoo.py --workdir runs/norm_zoo &&
  bnlab report runs/norm_zoo
Runtime: about 45 minutes on the 2-core CPU (10 vmapped programs of 5 trials).
Expected: BN-like variants >= 99.1%, LayerNorm/GroupNorm within 0.3 points of BN, population
BN and none below.
"""

from pathlib import Path

from bnlab.config import load_config

SMOKE = {"data.train_size": 1280, "train.epochs": 1}
SEEDS = range(5)
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


def get_config():
    c = load_config(Path(__file__).with_name("mnist_cnn.py"))
    c.train.log_every_steps = 100
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    for norm, extra in VARIANTS:
        for seed in SEEDS if not smoke else range(1):
            yield {"model.norm": norm, **extra, "train.seed": seed}

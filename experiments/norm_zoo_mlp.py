"""Every normalization of the registry on the Fig. 1 sigmoid MLP (and none + adaptive clipping).

Hypothesis: on Ioffe & Szegedy's 784-100x3-10 sigmoid MLP at its default settings
(experiments/bn_paper_mlp.py: 5 epochs at batch 60, SGD lr 0.5, weights from N(0, 0.01)),
every normalization with batch statistics in training trains fast, as BN does (Fig. 1a);
LayerNorm and GroupNorm too, the MLP having no batch dependence to lose; population BN (the
running statistics in training, which start at 0/1) and no normalization start slowly;
adaptive gradient clipping does not rescue the unnormalized sigmoid network's slow start.
The same settings as experiments/norm_zoo.py, with two changes the MLP's 100 units and batch
of 60 need: GroupNorm with 20 groups of 5 units, ghost BN over 3 virtual batches of 20.
Grid: 10 normalization settings x 5 seeds.
Command: bnlab sweep experiments/norm_zoo_mlp.py --workdir runs/norm_zoo_mlp &&
  bnlab report runs/norm_zoo_mlp
Runtime: 164 s on the 2-core CPU (10 vmapped programs of 5 seeds).
Expected: normalizations with batch or per-example statistics near BN's 97%+ after 5 epochs;
population BN and none far lower early and still lower at the end.
"""

from pathlib import Path

from bnlab.config import load_config, load_module

_ZOO = load_module(Path(__file__).with_name("norm_zoo.py"))
SEEDS, VARIANTS = _ZOO.SEEDS, _ZOO.VARIANTS

SMOKE = {"data.train_size": 1200, "train.epochs": 1}


def get_config():
    c = load_config(Path(__file__).with_name("bn_paper_mlp.py"))
    c.norm.num_groups = 20  # must divide the 100 units
    c.norm.virtual_batch_size = 20  # must divide the batch of 60
    c.train.log_every_steps = 200
    c.checkpoint.every_steps = 0
    return c


def sweep(smoke=False):
    for norm, extra in VARIANTS:
        for seed in SEEDS if not smoke else range(1):
            yield {"model.norm": norm, **extra, "train.seed": seed}

"""The `model` config group: architecture, normalization, nonlinearity and initialization.

Names only, no Flax: a config validates before JAX loads. `bnlab.nn.models` maps these names to
the models, nonlinearities and initializers (a test checks that the two agree).
"""

import dataclasses

from bnlab import schema
from bnlab.schema import field

MODEL_NAMES = ("mlp", "cnn")
ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "linear")
INIT_NAMES = ("lecun_normal", "he_normal", "normal")
PLACEMENTS = ("before", "after")
CONV_IMPLS = ("im2col", "xla")
MLP_HIDDEN = (100, 100, 100)  # Ioffe & Szegedy's Fig. 1 MLP: 784-100-100-100-10
NORM_MODULE = "norm"  # every model's name for its normalization layers (opt.trainable reads it)
# Features at each normalization site, in order, at the default sizes (`norm_widths`).
NORM_WIDTHS: dict[str, tuple[int, ...]] = {"mlp": MLP_HIDDEN, "cnn": (32, 64, 256)}


def norm_widths(model: "ModelConfig") -> tuple[int, ...]:
    """Features at each normalization site of `model`, in order: what a normalization's config
    check needs (the MLP's `mlp_depth` hidden layers of `mlp_width` units)."""
    if model.name == "mlp":
        return (model.mlp_width,) * model.mlp_depth
    return NORM_WIDTHS[model.name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` group: architecture, normalization and initialization."""

    name: str = field("cnn", '"cnn" (reference CNN) | "mlp" (Ioffe & Szegedy Fig. 1 MLP)',
                      choices=MODEL_NAMES)  # fmt: skip
    norm: str = field(
        "batchnorm",
        "normalization layer: a name registered in bnlab.norms (its fields are under norm)",
        choices="bnlab.nn.norms:NORMS",
    )
    placement: str = field(
        "before", 'normalization "before" | "after" the nonlinearity', choices=PLACEMENTS
    )
    activation: str = field(
        "relu", '"relu" | "sigmoid" | "tanh" | "linear"', choices=ACTIVATION_NAMES
    )
    init: str = field(
        "lecun_normal", 'kernel init: "lecun_normal" | "he_normal" | "normal"', choices=INIT_NAMES
    )
    init_std: float = field(0.01, 'standard deviation of the "normal" init', check=schema.positive)
    conv_impl: str = field(
        "im2col",
        'CNN convolutions: "im2col" (fast on CPU) | "xla" (cuDNN on GPU)',
        choices=CONV_IMPLS,
    )
    dropout: float = field(
        0.0,
        "dropout rate after each hidden block of the MLP and the CNN's dense block (0: off; "
        "training only)",
        check=lambda v: None if 0.0 <= v < 1.0 else "must lie in [0, 1) (0 turns dropout off)",
    )
    mlp_depth: int = field(
        len(MLP_HIDDEN),
        "MLP: hidden layers (3: the Fig. 1 MLP; deeper for rank collapse)",
        check=schema.positive,
    )
    mlp_width: int = field(MLP_HIDDEN[0], "MLP: units per hidden layer", check=schema.positive)
    dropout_conv: bool = field(
        False, "CNN: dropout after the conv blocks too (model.dropout's rate)"
    )

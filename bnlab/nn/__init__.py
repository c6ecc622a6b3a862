"""The Flax side: linen layers over `bnlab.ops` (`layers`), the models that take the norm layer
as an argument (`models`), the normalization registry (`norms`: name -> layer, config fields,
checks, PyTorch names in `torch_state`; its table and `NormSpec` in `norm_spec`), and Flax
NNX: `BatchNorm` (`nnx_bn`), the variants (`nnx_variants`), the config-built layers (`nnx`),
the models (`nnx_models`), and the NNX <-> linen state map (`nnx_state`).

A new normalization is a pure function in `bnlab.ops`, a layer here, and one `register_norm`
entry in `norms`. May import: the base modules, `bnlab.ops`, `bnlab.data`. Users import
`bnlab.layers`, `bnlab.models`, `bnlab.norms` and `bnlab.nnx`, the public paths of these modules.
"""

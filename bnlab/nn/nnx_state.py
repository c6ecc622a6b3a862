"""The map between an NNX model's state and linen's variables, and between optax states over
either (`bnlab.nnx` re-exports these functions; import them from there)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bnlab.types import PyTree

LinenVariables = dict[str, dict[str, Any]]  # {"params": {...}, "batch_stats": {...}}


def to_linen(model: nnx.Module) -> LinenVariables:
    """The variables of `model` as a linen variable dict: `{"params": ..., "batch_stats": ...}`.

    A variable at NNX path `a.b.name` of type `nnx.Param` becomes `variables["params"]["a"]["b"]
    ["name"]`; `nnx.BatchStat` goes to `"batch_stats"` (each type to the linen collection that
    flax registers for it, `nnx.variable_name_from_type`). The arrays are shared, not copied.
    A linen module with the same submodule names (e.g. `bnlab.models.CNN` and
    `bnlab.nn.nnx_models.CNN`) then applies them unchanged.

    Args:
      model: an NNX module (also an abstract one from `nnx.eval_shape`).

    Returns:
      A nested dict per collection, as linen's `init` returns it.

    Raises:
      ValueError: for a variable type with no linen collection (e.g. the keys of an `nnx.Rngs`
        held by the model).
    """
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        flat[(_collection(variable, path), *path)] = variable.get_value()
    return traverse_util.unflatten_dict(flat)


def from_linen(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets every variable of `model`, in place, from a linen variable dict (`to_linen`'s inverse).

    The map is one-to-one: `variables` must hold exactly the model's variables, each with its
    shape and dtype, so nothing is dropped, added or converted silently.

    Args:
      model: the NNX module to update (built with the linen model's settings).
      variables: `{"params": ..., "batch_stats": ...}` from linen's `init`, a checkpoint's
        `TrainState` fields, or `to_linen`.

    Raises:
      ValueError: listing the missing, unexpected and mismatched variables.
    """
    want = traverse_util.flatten_dict(to_linen(model))
    got = traverse_util.flatten_dict(dict(variables))
    _check_one_to_one(want, got)
    state = nnx.state(model)
    values = {key[1:]: jnp.asarray(value) for key, value in got.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(model, state)


def states_to_dicts(tree: PyTree) -> PyTree:
    """`tree` with every `nnx.State` in it replaced by its nested dict of arrays.

    For an optax state built over NNX parameters (`tx.init(params)` with `params` an
    `nnx.State`): the result has the layout of the same optax state built over linen's params,
    so it fits a `bnlab.training.train.TrainState` and a linen run's checkpoint.

    Args:
      tree: any pytree; the `nnx.State`s in it are converted, everything else is kept.

    Returns:
      The same tree with plain nested dicts (linen's layout) in place of the `nnx.State`s.
    """
    return jax.tree.map(
        lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state
    )


def dicts_to_states(tree: PyTree, like: PyTree) -> PyTree:
    """The inverse of `states_to_dicts`.

    Args:
      tree: `states_to_dicts` of a tree shaped like `like` (e.g. a restored checkpoint's
        `opt_state`).
      like: the tree in NNX's layout (e.g. the optax state of the NNX model); left unchanged.

    Returns:
      `like`'s structure, its `nnx.State`s holding the values of `tree`.

    Raises:
      ValueError: if `tree` has a key that a `nnx.State` of `like` does not.
    """

    def fill(template, values):
        if not _is_state(template):
            return values
        state = nnx.clone(template)
        nnx.replace_by_pure_dict(state, values)
        return state

    return jax.tree.map(fill, like, tree, is_leaf=_is_state)


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _collection(variable: nnx.Variable, path: tuple) -> str:
    try:
        return nnx.variable_name_from_type(type(variable))
    except ValueError as err:
        raise ValueError(
            f"to_linen: the {type(variable).__name__} at {'.'.join(map(str, path))} has no "
            "linen collection. Keep such state (e.g. an nnx.Rngs) outside the model, or register "
            "a collection for it with flax.nnx.register_variable_name(name, type)."
        ) from err


def _check_one_to_one(want: dict, got: dict) -> None:
    name = lambda key: "/".join(map(str, key))
    problems = [f"missing {name(k)} {_spec(want[k])}" for k in want if k not in got]
    problems += [f"unexpected {name(k)} {_spec(got[k])}" for k in got if k not in want]
    problems += [
        f"{name(k)} is {_spec(got[k])} but the model has {_spec(want[k])}"
        for k in want
        if k in got and _spec(got[k]) != _spec(want[k])
    ]
    if problems:
        raise ValueError(
            "from_linen: the variables do not match the model one-to-one: "
            + "; ".join(problems[:6])
            + ("; ..." if len(problems) > 6 else "")
            + ". Build the NNX model with the settings of the linen model that made them."
        )


def _spec(value) -> str:
    return f"{np.dtype(value.dtype).name}{list(np.shape(value))}"

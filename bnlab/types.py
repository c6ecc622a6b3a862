"""Type aliases shared across bnlab."""

from collections.abc import Mapping
from typing import Any

import jax

Array = jax.Array
PyTree = Any
Params = Mapping[str, Any]
BatchStats = Mapping[str, Any]
# {"mean": f32[C], "var": f32[C]} for one BN layer.
Stats = Mapping[str, jax.Array]

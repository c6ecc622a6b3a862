"""`bnlab.nnx`: the public path of `bnlab.nn.nnx`, the Flax NNX layers and state map.

The same module object as `bnlab.nn.nnx` (not a copy): either path reads and patches the same
names.
"""

import sys

from bnlab.nn import nnx as _module

sys.modules[__name__] = _module

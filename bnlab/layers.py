"""`bnlab.layers`: the public path of `bnlab.nn.layers`, the linen layers.

The same module object as `bnlab.nn.layers` (not a copy): either path reads and patches the same
names.
"""

import sys

from bnlab.nn import layers as _module

sys.modules[__name__] = _module

"""`bnlab.norms`: the public path of `bnlab.nn.norms`, the normalization registry.

The same module object as `bnlab.nn.norms` (not a copy): either path reads and patches the same
names.
"""

import sys

from bnlab.nn import norms as _module

sys.modules[__name__] = _module

"""`bnlab.models`: the public path of `bnlab.nn.models`, the Fig. 1 MLP and the reference CNN.

The same module object as `bnlab.nn.models` (not a copy): either path reads and patches the same
names.
"""

import sys

from bnlab.nn import models as _module

sys.modules[__name__] = _module

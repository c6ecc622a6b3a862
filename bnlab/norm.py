"""`bnlab.norm`: the public path of `bnlab.ops`, the pure normalizations.

The same module object as `bnlab.ops` (not a copy): either path reads and patches the same
names.
"""

import sys

from bnlab import ops as _module

sys.modules[__name__] = _module

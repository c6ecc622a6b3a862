"""`bnlab.results`: the public path of `bnlab.studies.results`, a sweep read back.

The same module object as `bnlab.studies.results` (not a copy): either path reads and patches
the same names.
"""

import sys

from bnlab.studies import results as _module

sys.modules[__name__] = _module

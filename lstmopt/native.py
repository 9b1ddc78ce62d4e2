"""Old import path of ``lstmopt.kernels.native`` (the native library and its load line): pickled artifacts and deployments name it.

The name is an alias of that module (the same object in ``sys.modules``), so monkeypatching and
``isinstance`` see one module and one class.
"""

import sys

from lstmopt.kernels import native as _module

sys.modules[__name__] = _module

"""Old import path of ``lstmopt.modules.packs`` (LayerPacks, PackedLayer and the packing checks): pickled artifacts and deployments name it.

The name is an alias of that module (the same object in ``sys.modules``), so monkeypatching and
``isinstance`` see one module and one class.
"""

import sys

from lstmopt.modules import packs as _module

sys.modules[__name__] = _module

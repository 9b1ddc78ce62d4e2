"""``python -m lstmopt`` is the ``lstmopt`` command."""

import sys

from .cli import main

sys.exit(main())

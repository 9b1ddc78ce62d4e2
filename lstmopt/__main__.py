"""``python -m lstmopt`` is the ``lstmopt`` command."""

import sys

from lstmopt.cli import main

sys.exit(main())

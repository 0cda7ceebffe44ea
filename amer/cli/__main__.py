"""``python -m amer.cli``: the same as the ``amer`` console script."""

import sys

from amer.cli import main

sys.exit(main())

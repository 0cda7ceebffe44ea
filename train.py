"""Train a hybrid model: `python train.py` runs the `small` preset on the bundled corpus (see --help)."""

import sys

from amer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

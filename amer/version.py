"""amer's version, in a module of its own so that what records it (checkpoints, pretrained folders) need not
import the package's public namespace."""

__version__ = "0.1.0"

"""The package's version, in a module of its own: what writes it into files needs nothing else."""

__version__ = "0.1.0"

"""Subcommands of the ``headlens`` command line (see :mod:`headlens.cli`)."""

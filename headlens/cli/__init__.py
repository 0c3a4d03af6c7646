"""The ``headlens`` command line.

Owns: :mod:`~headlens.cli.app` (builds the parser and runs a subcommand); each subcommand is a
module here with ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; :mod:`~headlens.cli.options` declares the options several subcommands share;
:mod:`~headlens.cli.outputs` checks, locks and writes a command's results on rank 0 only.
May import every stage; nothing in headlens imports it.
Public names: ``main``, ``build_parser``.
"""
from headlens.cli.app import build_parser, main

__all__ = ["main", "build_parser"]

"""The ``headlens`` command: its parser and dispatch. Each subcommand is a module of :mod:`headlens.cli` with
``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``, and
``DISTRIBUTED = True`` if it shares its work over the ranks of a ``torchrun`` job (the others
refuse to start under one rather than run once per rank)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from headlens.errors import HeadlensError

SUBCOMMANDS = ["report", "models", "scores", "importance", "prune", "circuits", "kv_heads", "train_toy"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headlens",
        description="Attention-head analysis: every head's pattern, importance, role, cluster "
                    "and a pruning plan. Run 'headlens report' for the whole pipeline.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        mod = importlib.import_module(f"headlens.cli.{module_name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _distributed=getattr(mod, "DISTRIBUTED", False))
    return parser


def _quiet_unless(main: bool):
    """Under ``torchrun`` only rank 0 prints results (the others' stdout goes nowhere; errors still show)."""
    if main:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``; none: ``report``). Returns the exit
    status: 0, 2 for a :class:`HeadlensError` (printed as one line), 130 when interrupted (Ctrl-C,
    also while the libraries load). Under ``torchrun`` each rank runs it in the job's process
    group (see :mod:`headlens.runtime.distributed`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["report"]  # the main job
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args._distributed:
            shared = ", ".join(m.replace("_", "-") for m in SUBCOMMANDS if getattr(
                importlib.import_module(f"headlens.cli.{m}"), "DISTRIBUTED", False))
            raise HeadlensError(f"headlens {args.command} runs in one process: launch it without torchrun "
                                f"(WORLD_SIZE is {os.environ['WORLD_SIZE']}; the commands that share their work "
                                f"over ranks are {shared})")
        from headlens.runtime import from_torchrun  # imports torch: inside, so Ctrl-C there is one line

        with from_torchrun(getattr(args, "device", None)) as world, _quiet_unless(world.is_main):
            return int(args._run(args) or 0)
    except HeadlensError as e:
        print(f"headlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

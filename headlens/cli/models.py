"""``headlens models``: the bundled models, or with ``--families`` the supported architectures."""
from __future__ import annotations

import textwrap

DISTRIBUTED = True  # lists only: harmless on every rank, rank 0 prints (see headlens.cli.app)
NAME = "models"
HELP = "list the bundled models (or, with --families, the architectures headlens reads)"
DESCRIPTION = ("List the models headlens.load() knows by name: name, family, layers, heads, whether "
               "the weights are on this machine. Any local transformers folder or hub name of a "
               "supported family loads too (see --families).")


def add_arguments(parser) -> None:
    parser.add_argument("--families", action="store_true",
                        help="list the supported model families and their transformers model_types")


def families_table():
    """One row per supported family: ``family, model_types, hf_class, exportable, description``."""
    import pandas as pd

    from headlens.io.families import FAMILIES
    from headlens.io.to_hf import is_exportable

    rows = [{"family": f.name, "model_types": ", ".join(f.model_types), "hf_class": f.hf_class,
             "exportable": is_exportable(f),
             "description": f.description} for f in FAMILIES.values()]
    return pd.DataFrame(rows, columns=["family", "model_types", "hf_class", "exportable", "description"])


def run(args) -> int:
    from headlens.io.loading import list_models

    table = families_table() if args.families else list_models()
    key = "family" if args.families else "name"
    print(table.drop(columns="description").to_string(index=False))
    print()
    for row in table.itertuples():
        print(textwrap.fill(row.description, width=100, initial_indent=f"{getattr(row, key)}: ",
                            subsequent_indent="    "))
    return 0

"""headlens: attention-head analysis on an explicit per-head transformer.

The package reads as its pipeline (see docs/ARCHITECTURE.md):
``model`` -> ``io`` -> ``patterns`` | ``importance`` -> ``pruning`` -> ``reporting`` -> ``cli``,
with ``data`` (bundled files) underneath and ``synthetic`` (known-role models) beside it.
The entry points are :func:`headlens.load` and :func:`headlens.report`.

The public names are imported when first used (``headlens.load`` imports torch, transformers
...), so that ``import headlens.cli`` -- the ``headlens`` command -- starts without them and an
interruption (Ctrl-C) while they load is the command's to report in one line.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from headlens.errors import HeadlensError

_PUBLIC = {"ModelConfig": "headlens.model", "HeadlensModel": "headlens.model", "from_hf_model": "headlens.io",
           "load": "headlens.io", "list_models": "headlens.io", "report": "headlens.reporting",
           "Report": "headlens.reporting", "viz": "headlens.viz"}  # headlens.viz.attention: the offline viewer

__all__ = ["ModelConfig", "HeadlensError", "HeadlensModel", "from_hf_model", "load", "list_models",
           "report", "Report"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from headlens import viz as viz
    from headlens.io import from_hf_model, list_models, load
    from headlens.model import HeadlensModel, ModelConfig
    from headlens.reporting import Report, report


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'headlens' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if name == "viz" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

"""headlens: attention-head analysis on an explicit per-head transformer.

The package reads as its pipeline (see docs/ARCHITECTURE.md):
``model`` -> ``io`` -> ``patterns`` | ``importance`` -> ``pruning`` -> ``reporting`` -> ``cli``,
with ``data`` (bundled files) underneath and ``synthetic`` (known-role models) beside it.
The entry points are :func:`headlens.load` and :func:`headlens.report`.
"""
from headlens import viz as viz  # headlens.viz.attention: the offline attention viewer
from headlens.errors import HeadlensError
from headlens.io import from_hf_model, list_models, load
from headlens.model import HeadlensModel, ModelConfig
from headlens.reporting import Report, report

__all__ = ["ModelConfig", "HeadlensError", "HeadlensModel", "from_hf_model", "load", "list_models",
           "report", "Report"]
__version__ = "0.1.0"

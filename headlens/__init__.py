"""headlens: attention-head analysis on an explicit per-head transformer."""
from .config import ModelConfig
from .errors import HeadlensError
from .model import HeadlensModel
from .convert import from_hf_model
from .load import list_models, load

__all__ = ["ModelConfig", "HeadlensError", "HeadlensModel", "from_hf_model", "load", "list_models"]
__version__ = "0.1.0"
# the main job: headlens.report(...) -> Report (the module stays importable as headlens.report
# for "from headlens.report import ..."; the attribute is the function)
from .report import Report, report  # noqa: E402

__all__ += ["report", "Report"]

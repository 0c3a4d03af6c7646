"""headlens: attention-head analysis on an explicit per-head transformer."""
from .config import ModelConfig
from .errors import HeadlensError
from .model import HeadlensModel
from .convert import from_hf_model
from .load import list_models, load

__all__ = ["ModelConfig", "HeadlensError", "HeadlensModel", "from_hf_model", "load", "list_models"]
__version__ = "0.1.0"

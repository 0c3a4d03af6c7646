"""Supported model families. Importing this package registers all of them."""
from .base import FAMILIES, Family, convert_state_dict, family_for_model_type, register  # noqa: F401
from . import gpt2, bert  # noqa: F401,E402
from . import llama, neox  # noqa: F401,E402

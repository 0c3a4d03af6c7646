"""Supported model families. Importing this package registers all of them, in this order."""
# isort: skip_file
from headlens.io.families.base import FAMILIES, Family, convert_state_dict, family_for_model_type, register  # noqa: F401
from headlens.io.families import gpt2, bert, llama, neox, gemma, olmo2, phi3  # noqa: F401

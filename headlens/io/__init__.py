"""Getting models in and out: families' weight maps, transformers conversion both ways, headlens'
own checkpoint folders, GGUF files, the bundled models and the one ``load`` entry point.

Owns: :mod:`~headlens.io.families` (a family = configuration + a weight-name map),
:mod:`~headlens.io.from_hf` / :mod:`~headlens.io.to_hf` (transformers state <-> headlens),
:mod:`~headlens.io.native` (headlens checkpoint folders), :mod:`~headlens.io.tokenizers`,
:mod:`~headlens.io.gguf`, :mod:`~headlens.io.bundled` (models by name) and
:mod:`~headlens.io.loading` (``load``, ``list_models``).
May import: :mod:`headlens.model`, :mod:`headlens.data`, :mod:`headlens.errors`, :mod:`headlens.files`.
Public names: ``load``, ``list_models``, ``from_hf_model``, ``save_hf``, ``save_model``, ``load_model``.
"""
from headlens.io.from_hf import from_hf_model
from headlens.io.loading import list_models, load
from headlens.io.native import load_model, save_model
from headlens.io.to_hf import save_hf

__all__ = ["load", "list_models", "from_hf_model", "save_hf", "save_model", "load_model"]

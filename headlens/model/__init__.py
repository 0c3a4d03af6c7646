"""The transformer headlens analyses: one explicit per-head model for every family.

Owns: the configuration (:mod:`~headlens.model.config`), norms / rotary / MLPs
(:mod:`~headlens.model.layers`), per-head attention with TransformerLens hook points
(:mod:`~headlens.model.attention`), the model (:mod:`~headlens.model.transformer`), turning text
into batches (:mod:`~headlens.model.tokens`) and head bookkeeping (:mod:`~headlens.model.heads`).
May import: :mod:`headlens.errors`, :mod:`headlens.data`. Nothing else of headlens.
Public names: ``ModelConfig``, ``HeadlensModel``, ``parse_dtype``.
"""
from headlens.model.config import ModelConfig, parse_dtype
from headlens.model.transformer import HeadlensModel

__all__ = ["ModelConfig", "HeadlensModel", "parse_dtype"]

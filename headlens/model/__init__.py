"""The transformer headlens analyses: one explicit per-head model for every family.

Owns: the configuration (:mod:`~headlens.model.config`), norms / rotary / MLPs
(:mod:`~headlens.model.layers`), per-head attention with TransformerLens hook points
(:mod:`~headlens.model.attention`), the model (:mod:`~headlens.model.transformer`), turning text
into batches (:mod:`~headlens.model.tokens`), head bookkeeping (:mod:`~headlens.model.heads`),
the key/value cache (:mod:`~headlens.model.kv_cache`) and TransformerLens' surface on the model:
config names (:mod:`~headlens.model.tl_config`), token helpers (:mod:`~headlens.model.tl_tokens`),
``run_with_cache`` / loss / switches (:mod:`~headlens.model.tl_run`), per-head inputs
(:mod:`~headlens.model.tl_inputs`), weight stacks (:mod:`~headlens.model.tl_weights`), weight
processing (:mod:`~headlens.model.processing`) and ``generate`` (:mod:`~headlens.model.generate`).
May import: :mod:`headlens.errors`, :mod:`headlens.data`. Nothing else of headlens.
Public names: ``ModelConfig``, ``HeadlensModel``, ``parse_dtype``.
"""
from headlens.model.config import ModelConfig, parse_dtype
from headlens.model.transformer import HeadlensModel

__all__ = ["ModelConfig", "HeadlensModel", "parse_dtype"]

"""From a ``transformers`` model object (or its config and state dict) to a :class:`HeadlensModel`
on the same weights."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from headlens.errors import HeadlensError
from headlens.io.families import convert_state_dict, family_for_model_type
from headlens.io.tokenizers import check_vocab
from headlens.model.transformer import HeadlensModel


def from_hf_model(hf_model, tokenizer=None, dtype: Optional[torch.dtype] = None,
                  device=None, name: Optional[str] = None) -> HeadlensModel:
    """Build a headlens model holding the same weights as the ``transformers`` model ``hf_model``
    (copies: later edits to one model do not change the other)."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "model_type") or not hasattr(hf_model, "state_dict"):
        raise HeadlensError(f"expected a transformers PreTrainedModel, got {type(hf_model).__name__}")
    config = copy.copy(config)  # the model's own class says which heads it has, not config.json
    config.architectures = [type(hf_model).__name__]
    dtype = dtype or next(hf_model.parameters()).dtype
    return from_hf_state(config, hf_model.state_dict(), tokenizer, dtype, device, name)


def from_hf_state(config, hf_state: dict, tokenizer=None, dtype: Optional[torch.dtype] = None,
                  device=None, name: Optional[str] = None,
                  kept_heads: Optional[list] = None) -> HeadlensModel:
    """Build a headlens model from a ``transformers`` config and state dict (names as saved by
    ``transformers``). ``kept_heads`` reads a physically pruned checkpoint (see
    :mod:`headlens.io.to_hf`). Tensors are copied, never shared with ``hf_state``."""
    family = family_for_model_type(config.model_type)
    cfg = family.config_from_hf(config)
    cfg.name = name or getattr(config, "_name_or_path", "") or config.model_type
    if kept_heads is not None:
        cfg = cfg.replace(kept_heads=kept_heads)
    if tokenizer is not None:
        _fill_special_tokens(cfg, tokenizer)
    state = convert_state_dict(family, cfg, hf_state)
    device = torch.device(device or "cpu")
    state = {k: v.detach().to(device=device, dtype=dtype or v.dtype, copy=True,
                              memory_format=torch.contiguous_format)
             for k, v in state.items()}
    model = HeadlensModel.from_state_dict(cfg, state, tokenizer)
    check_vocab(model)  # the tokenizer must fit the embedding matrix
    return model


def _fill_special_tokens(cfg, tokenizer) -> None:
    if cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if cfg.bos_token_id is None and getattr(tokenizer, "bos_token_id", None) is not None and cfg.causal:
        cfg.bos_token_id = tokenizer.bos_token_id
    if cfg.eos_token_id is None and getattr(tokenizer, "eos_token_id", None) is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
    seps = {getattr(tokenizer, "sep_token_id", None), cfg.eos_token_id}
    cfg.sep_token_ids = sorted(s for s in seps if s is not None)

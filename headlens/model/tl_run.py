"""TransformerLens' running surface on :class:`~headlens.model.HeadlensModel`: ``run_with_cache``
returning a real :class:`transformer_lens.ActivationCache`, the language-model loss
(``return_type="loss"`` / ``"both"``, ``loss_fn``) and the ``set_use_*`` switches.

``run_with_cache`` caches every hook point except ``hook_result`` (``[B, P, H, D]`` per layer, the
largest activation), as TransformerLens does unless ``cfg.use_attn_result`` is set (with
:meth:`set_use_attn_result`); ``cache.stack_head_results()`` computes it from ``hook_z`` when
needed. A ``names_filter`` that names ``hook_result`` caches it too.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from headlens.errors import HeadlensError, check

RETURN_TYPES = ("logits", "hidden", "loss", "both", None)


def _not_result(name: str) -> bool:
    return not name.endswith("attn.hook_result")


class RunSurface:
    """Mixin: ``run_with_cache`` (-> ``ActivationCache``), ``loss_fn``, ``set_use_*``."""

    def run_with_cache(self, *model_args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice=None, return_cache_object: bool = True, **model_kwargs):
        """Run the model and cache activations: ``(output, cache)``, ``cache`` a TransformerLens
        ``ActivationCache`` (``cache["pattern", 0]``, ``cache.stack_head_results()``,
        ``cache.decompose_resid()`` ...; a plain dict with ``return_cache_object=False``).
        ``incl_bwd=True`` backpropagates the output (a scalar, e.g. ``return_type="loss"``) and
        caches each gradient as ``NAME + "_grad"``."""
        if names_filter is None and not self.cfg.use_attn_result:
            names_filter = _not_result
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, device=device,
                                            remove_batch_dim=remove_batch_dim, incl_bwd=incl_bwd,
                                            reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts,
                                            pos_slice=pos_slice, **model_kwargs)
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy (TransformerLens' ``lm_cross_entropy_loss``): the mean over
        predicted tokens, or ``[B, P - 1]`` with ``per_token``; padding (``attention_mask`` 0)
        and the tokens after it are left out."""
        check(logits.ndim == 3 and tokens.shape == logits.shape[:2],
              f"loss_fn needs logits [batch, pos, vocab] and tokens [batch, pos], got "
              f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
        check(tokens.shape[1] >= 2, "the loss needs at least two tokens (it predicts each next one)")
        tokens = tokens.to(logits.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(logits.device).bool()
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    def _output(self, return_type, logits, input_ids, attention_mask, loss_per_token: bool):
        """What :meth:`forward` returns for ``return_type`` (``logits`` already computed)."""
        if return_type in ("logits", "hidden"):
            return logits
        cfg = self.cfg
        if not (cfg.causal and cfg.unembed == "lm"):
            raise HeadlensError(f"return_type={return_type!r} needs a causal language model; this is "
                                f"{'an encoder' if not cfg.causal else 'a model without an LM head'}")
        check(input_ids is not None, f"return_type={return_type!r} needs the input tokens, not a residual")
        loss = self.loss_fn(logits, input_ids, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    # --- TransformerLens' switches (see headlens.model.tl_config) --------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute and cache ``hook_result [B, P, H, D]`` on every run."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """One residual copy per head for queries, keys and values (``hook_q_input`` ...)."""
        check(not (use_split_qkv_input and self.cfg.use_attn_in),
              "use_split_qkv_input and use_attn_in are mutually exclusive: set_use_attn_in(False) first")
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """One residual copy per head shared by its queries, keys and values (``hook_attn_in``)."""
        check(not (use_attn_in and self.cfg.use_split_qkv_input),
              "use_attn_in and use_split_qkv_input are mutually exclusive: set_use_split_qkv_input(False) first")
        self.cfg.use_attn_in = bool(use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire ``hook_mlp_in`` (a copy of the MLP's input, before ``ln2``)."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_attn_implementation(self, implementation: str) -> None:
        """``"sdpa"`` (default): torch's ``scaled_dot_product_attention`` in each layer whose scores,
        pattern and per-head values nothing reads, the explicit path elsewhere; ``"eager"``: the
        explicit per-head path in every layer (see :mod:`headlens.model.attention`)."""
        check(implementation in ("sdpa", "eager"),
              f"attn_implementation must be 'sdpa' or 'eager', got {implementation!r}")
        self.cfg.attn_implementation = implementation

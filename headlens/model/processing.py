"""TransformerLens' weight processing: fold the norms, centre the writing weights and the
unembedding, fold the value biases. The model's outputs do not change (up to float rounding);
its coordinates do, to the ones TransformerLens' analyses assume (``HookedTransformer`` loads
with these by default, a ``TransformerBridge`` after ``enable_compatibility_mode()``).

Why it matters: direct logit attribution divides each residual component by the final norm's
cached scale and dots it with ``W_U`` columns. That sums to the logit only when the norm's weight
is inside ``W_U`` and its bias inside ``b_U``, which is what ``fold_ln`` does.

The steps, as TransformerLens 4.3 defines them (``transformer_lens.weight_processing``):

- ``fold_ln``: each pre-norm's weight ``w`` multiplies the rows of the matrices reading from it
  (``W_Q``, ``W_K``, ``W_V`` after ``ln1``; ``W_in`` / ``W_gate`` after ``ln2``; ``W_U`` after
  ``ln_final``) and its bias ``b`` moves into their biases (``b_Q += b @ W_Q`` ...); the norms are
  left with weight 1 and bias 0 (TL's ``LNPre`` / ``RMSPre``; Gemma's ``1 + w`` norms fold ``1 + w``
  and keep ``w = 0``). For LayerNorm the reading matrices are then centred over ``D`` (their input
  is centred anyway). Norms on the sublayer outputs (Gemma's and OLMo 2's ``ln1_post`` /
  ``ln2_post``) stay, as in TransformerLens.
- ``center_writing_weights`` (pre-LayerNorm models): ``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``,
  ``b_out`` get their mean over ``D`` removed (the next LayerNorm removes it anyway).
- ``center_unembed``: ``W_U`` and ``b_U`` get their mean over the vocabulary removed (softmax
  ignores it; not with a final logit soft-cap, which does not).
- ``fold_value_biases``: ``b_O += sum_h b_V[h] @ W_O[h]`` and ``b_V = 0`` (a head's pattern
  rows sum to 1, so its value bias always adds ``b_V[h] @ W_O[h]``).

Tied embeddings are untied first when ``W_U`` changes (``ln_final``'s weight, centring), biases a
fold needs are created as zeros, and the config is updated to match (``tie_embeddings``,
``qkv_bias``, ``unembed_bias`` ..., ``layer_norm_folding``).
"""
from __future__ import annotations

import torch
from torch import nn

from headlens.errors import check


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class WeightProcessing:
    """Mixin: :meth:`process_weights` and TL's :meth:`enable_compatibility_mode`."""

    @torch.no_grad()
    def process_weights(self, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True,
                        refactor_factored_attn_matrices: bool = False):
        """Rewrite the weights in place as TransformerLens does (see the module docstring);
        returns the model. Computed in float32, stored back in the model's dtype."""
        cfg = self.cfg
        check(not refactor_factored_attn_matrices, "refactor_factored_attn_matrices is not supported")
        check(not cfg.is_pruned, "process_weights needs an unpruned model")
        is_ln = cfg.norm == "layernorm"
        if fold_ln or (center_writing_weights and is_ln):
            check(cfg.norm_position != "post" and cfg.unembed != "mlm" and not cfg.embed_norm,
                  "fold_ln and center_writing_weights need norms before the sublayers (post-norm models "
                  "such as BERT cannot be folded)")
        center_writing_weights = center_writing_weights and is_ln and cfg.norm_position == "pre"
        dtype = self.dtype
        requires_grad = {name: p.requires_grad for name, p in self.named_parameters()}
        self.float()
        if fold_ln and cfg.norm != "none" and not cfg.layer_norm_folding:
            self._fold_norms(center=is_ln)
        if center_writing_weights:
            self._center_writing_weights()
        if center_unembed and self.unembed is not None and not cfg.output_logits_soft_cap:
            self._untie()
            W_U = self.unembed.W_U
            W_U.sub_(W_U.mean(-1, keepdim=True))
            if self.unembed.b_U is not None:
                self.unembed.b_U.sub_(self.unembed.b_U.mean())
        if fold_value_biases:
            self._fold_value_biases(center=center_writing_weights)
        self.to(dtype)
        for name, p in self.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        return self

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False):
        """TransformerBridge's name for it: :meth:`process_weights` with TL's defaults (nothing
        with ``no_processing=True``; headlens' hook names need no compatibility layer)."""
        if not no_processing:
            self.process_weights(fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                                 refactor_factored_attn_matrices)
        return self

    # --- the steps --------------------------------------------------------------------------------
    def _untie(self) -> None:
        """Give the unembedding its own ``W_U [D, V]`` (and a zero ``b_U``) before it changes."""
        cfg, unembed = self.cfg, self.unembed
        if cfg.tie_embeddings:
            unembed.W_U = _param(self.W_E.T.clone())
            cfg.tie_embeddings = False
        if unembed.b_U is None:
            unembed.b_U = _param(torch.zeros(cfg.vocab_size, device=self.device))
            cfg.unembed_bias = True

    def _fold_norms(self, center: bool) -> None:
        cfg = self.cfg
        for block in self.blocks:  # the norms before the sublayers; ln1_post / ln2_post stay
            attn, ln1, ln2 = block.attn, getattr(block, "ln1", None), getattr(block, "ln2", None)
            if ln1 is not None:
                if getattr(ln1, "bias", None) is not None:
                    self._ensure_qkv_biases(attn)
                for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)):  # W [D, n, d]
                    _fold_into(ln1, W, b, lambda t: t[:, None, None], center)
                _reset_norm(ln1)
            if block.mlp is not None and ln2 is not None:
                linears = [block.mlp.linear("W_in")] + ([block.mlp.linear("W_gate")] if block.mlp.gated else [])
                for lin in linears:  # weight [F, D]
                    if getattr(ln2, "bias", None) is not None and lin.bias is None:
                        lin.bias = _param(torch.zeros(lin.out_features, device=self.device))
                        cfg.mlp_bias = True
                    _fold_into(ln2, lin.weight.T, lin.bias, lambda t: t[:, None], center)
                _reset_norm(ln2)
        if self.ln_final is not None and self.unembed is not None:
            self._untie()
            _fold_into(self.ln_final, self.unembed.W_U, self.unembed.b_U, lambda t: t[:, None], center)
            _reset_norm(self.ln_final)
        cfg.layer_norm_folding = True

    def _ensure_qkv_biases(self, attn) -> None:
        if attn.b_Q is None:
            d = self.cfg.d_head
            attn.b_Q = _param(torch.zeros(attn.n_heads, d, device=self.device))
            attn.b_K = _param(torch.zeros(attn.n_kv_heads, d, device=self.device))
            attn.b_V = _param(torch.zeros(attn.n_kv_heads, d, device=self.device))
            self.cfg.qkv_bias = True

    def _center_writing_weights(self) -> None:
        self.W_E.sub_(self.W_E.mean(-1, keepdim=True))
        if "W_pos" in self._modules:
            self.W_pos.sub_(self.W_pos.mean(-1, keepdim=True))
        if self.W_token_type is not None:
            self.W_token_type.weight.sub_(self.W_token_type.weight.mean(-1, keepdim=True))
        for block in self.blocks:
            attn = block.attn
            attn.W_O.sub_(attn.W_O.mean(-1, keepdim=True))  # [H, d, D]
            if attn.b_O is not None:
                attn.b_O.sub_(attn.b_O.mean())
            if block.mlp is not None:
                W_out = block.mlp.linear("W_out")  # weight [D, F]
                W_out.weight.sub_(W_out.weight.mean(0, keepdim=True))
                if W_out.bias is not None:
                    W_out.bias.sub_(W_out.bias.mean())

    def _fold_value_biases(self, center: bool) -> None:
        for block in self.blocks:
            attn = block.attn
            if attn.b_V is None:
                continue
            b_V = attn.b_V.index_select(0, attn.kv_map)  # [H, d], one per query head
            folded = torch.einsum("hd,hdm->m", b_V, attn.W_O)
            if attn.b_O is None:
                attn.b_O = _param(torch.zeros(self.cfg.d_model, device=self.device))
                self.cfg.out_bias = True
            attn.b_O.add_(folded)
            if center:
                attn.b_O.sub_(attn.b_O.mean())
            attn.b_V.zero_()


def _fold_into(norm: nn.Module, W: torch.Tensor, b, shape, center: bool) -> None:
    """Fold ``norm``'s weight / bias into the reading matrix ``W`` (``D`` first: ``[D, ...]``,
    a view of the parameter) and its bias ``b`` (``W``'s trailing shape); centre ``W`` over ``D``
    when ``center``."""
    bias = getattr(norm, "bias", None)
    if bias is not None and b is not None:
        b.add_(torch.einsum("m,m...->...", bias, W))
    W.mul_(shape(_scale(norm)))
    if center:
        W.sub_(W.mean(0, keepdim=True))


def _scale(norm: nn.Module) -> torch.Tensor:
    """What the norm multiplies by: its weight, or ``1 + weight`` (Gemma's ``offset``)."""
    return 1.0 + norm.weight if getattr(norm, "offset", False) else norm.weight


def _reset_norm(norm: nn.Module) -> None:
    """Leave ``norm`` scaling by 1 (an offset norm's weight 0) and adding nothing."""
    if getattr(norm, "weight", None) is not None:
        norm.weight.fill_(0.0 if getattr(norm, "offset", False) else 1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()

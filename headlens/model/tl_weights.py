"""TransformerLens' model-level weights on :class:`~headlens.model.HeadlensModel`.

Stacks over layers in TransformerLens' axis order (``L`` layers, ``H`` query heads, ``K``
key/value heads, ``D`` d_model, ``d`` d_head, ``F`` d_mlp, ``V`` vocabulary):

========================= ======================= ==========================================
``W_Q``                   ``[L, H, D, d]``        ``b_Q`` ``[L, H, d]``
``W_K``, ``W_V``          ``[L, H, D, d]``        expanded to query heads under grouped-query
                                                  attention (query head ``h`` reads key/value
                                                  head ``h // (H // K)``), as TL's ``W_K``
``_W_K``, ``_W_V``        ``[L, K, D, d]``        the stored, unexpanded ones (TL's names);
                                                  ``b_K`` / ``b_V`` / ``_b_K`` / ``_b_V`` alike
``W_O``                   ``[L, H, d, D]``        ``b_O`` ``[L, D]``
``W_in``, ``W_gate``      ``[L, D, F]``           ``b_in`` ``[L, F]`` (``W_gate``: gated MLPs)
``W_out``                 ``[L, F, D]``           ``b_out`` ``[L, D]``
``W_E`` / ``W_pos``       ``[V, D]`` / ``[n_ctx, D]``  (``W_pos``: learned positions only)
``W_U`` / ``b_U``         ``[D, V]`` / ``[V]``
``QK`` / ``OV``           ``[L, H, D, D]``        :class:`transformer_lens.FactoredMatrix`:
                                                  ``W_Q W_K^T`` and ``W_V W_O``
========================= ======================= ==========================================

Missing biases read as zeros (as in TL's ``HookedTransformer``). The stacks are views or copies
of the parameters for reading; change weights through the parameters themselves. Per block,
headlens stores ``blocks[l].attn.W_Q`` as ``[D, H, d]`` (``W_O`` is ``[H, d, D]`` as in TL).
A physically pruned model (layers with different head counts) has no stacks: use its blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformer_lens import FactoredMatrix

from headlens.errors import check


class WeightStacks:
    """Mixin: the model-level weights above, ``tokens_to_residual_directions``,
    ``accumulated_bias`` and ``all_head_labels``; keeps ``cfg.device`` / ``cfg.dtype`` current."""

    def _sync_cfg(self) -> None:
        """Keep TransformerLens' ``cfg.device`` / ``cfg.dtype`` those of the weights."""
        self.cfg.device, self.cfg.dtype = self.device, self.dtype

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._sync_cfg()
        return out

    # --- embeddings and unembedding -------------------------------------------------------------
    # W_E and W_pos are TL's tensors; the nn.Embedding modules that hold them keep their place
    # (and their state-dict names W_E.weight / W_pos.weight): model.get_submodule("W_E").
    @property
    def W_E(self) -> torch.Tensor:
        module = self._modules.get("W_E")
        if module is None:
            raise AttributeError("W_E: the model is not built yet")
        return module.weight

    @property
    def W_pos(self) -> torch.Tensor:
        module = self._modules.get("W_pos")
        if module is None:
            raise AttributeError(f"W_pos: this model has {self.cfg.positional!r} positions, no learned "
                                 "positional embedding")
        return module.weight

    @property
    def W_E_pos(self) -> torch.Tensor:
        """``[V + n_ctx, D]``: ``W_E`` and ``W_pos`` stacked."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> torch.Tensor:
        if self.unembed is None:
            raise AttributeError("W_U: this model has no output head")
        return self.W_E.T if self.cfg.tie_embeddings else self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        if self.unembed is None:
            raise AttributeError("b_U: this model has no output head")
        b = self.unembed.b_U
        return b if b is not None else torch.zeros(self.cfg.vocab_size, dtype=self.dtype, device=self.device)

    # --- attention ------------------------------------------------------------------------------
    def _stack(self, fn) -> torch.Tensor:
        per_layer = [fn(block) for block in self.blocks]
        check(len({tuple(t.shape) for t in per_layer}) == 1,
              "model-level weight stacks need the same heads in every layer; this model is pruned: "
              "read model.blocks[layer].attn instead")
        return torch.stack(per_layer)

    def _zeros_if_none(self, t: Optional[torch.Tensor], *shape) -> torch.Tensor:
        return t if t is not None else torch.zeros(*shape, dtype=self.dtype, device=self.device)

    @property
    def W_Q(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_Q.permute(1, 0, 2))

    @property
    def _W_K(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_K.permute(1, 0, 2))

    @property
    def _W_V(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_V.permute(1, 0, 2))

    @property
    def W_K(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_K.permute(1, 0, 2).index_select(0, b.attn.kv_map))

    @property
    def W_V(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_V.permute(1, 0, 2).index_select(0, b.attn.kv_map))

    @property
    def W_O(self) -> torch.Tensor:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> torch.Tensor:
        return self._stack(lambda b: self._zeros_if_none(b.attn.b_Q, b.attn.n_heads, self.cfg.d_head))

    @property
    def _b_K(self) -> torch.Tensor:
        return self._stack(lambda b: self._zeros_if_none(b.attn.b_K, b.attn.n_kv_heads, self.cfg.d_head))

    @property
    def _b_V(self) -> torch.Tensor:
        return self._stack(lambda b: self._zeros_if_none(b.attn.b_V, b.attn.n_kv_heads, self.cfg.d_head))

    @property
    def b_K(self) -> torch.Tensor:
        return self._b_K.index_select(1, self.blocks[0].attn.kv_map)

    @property
    def b_V(self) -> torch.Tensor:
        return self._b_V.index_select(1, self.blocks[0].attn.kv_map)

    @property
    def b_O(self) -> torch.Tensor:
        return self._stack(lambda b: self._zeros_if_none(b.attn.b_O, self.cfg.d_model))

    @property
    def QK(self) -> FactoredMatrix:
        """``[L, H, D, D]``: each head's bilinear form on (query residual, key residual)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``[L, H, D, D]``: each head's map from the residual it reads to what it writes."""
        return FactoredMatrix(self.W_V, self.W_O)

    # --- MLP ------------------------------------------------------------------------------------
    def _mlp_stack(self, name: str, fn) -> torch.Tensor:
        if self.blocks[0].mlp is None:
            raise AttributeError(f"{name}: this model is attention-only")
        return self._stack(lambda b: fn(b.mlp))

    @property
    def W_in(self) -> torch.Tensor:
        return self._mlp_stack("W_in", lambda m: m.W_in)

    @property
    def W_gate(self) -> Optional[torch.Tensor]:
        """``[L, D, F]`` for gated MLPs (SwiGLU, GeGLU); None otherwise (as TL)."""
        if not self.cfg.gated_mlp:
            return None
        return self._mlp_stack("W_gate", lambda m: m.W_gate)

    @property
    def W_out(self) -> torch.Tensor:
        return self._mlp_stack("W_out", lambda m: m.W_out)

    @property
    def b_in(self) -> torch.Tensor:
        return self._mlp_stack("b_in", lambda m: m.b_in)

    @property
    def b_out(self) -> torch.Tensor:
        return self._mlp_stack("b_out", lambda m: m.b_out)

    # --- helpers TransformerLens' ActivationCache calls -----------------------------------------
    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The columns of ``W_U`` of ``tokens`` (a token string, an id, or ids of any shape):
        ``[D]``, or ``[*tokens.shape, D]``. As TL warns: unless the final norm is folded into
        ``W_U`` (:meth:`process_weights`), these directions leave out the norm's weight."""
        if isinstance(tokens, str):
            return self.W_U[:, self.to_single_token(tokens)]
        if isinstance(tokens, int) or (isinstance(tokens, torch.Tensor) and tokens.numel() == 1):
            return self.W_U[:, int(tokens)]
        tokens = torch.as_tensor(tokens, device=self.device)
        return self.W_U[:, tokens].movedim(0, -1)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """``[D]``: the output biases (attention ``b_O``, MLP ``b_out``) added to the residual
        stream before layer ``layer``; ``mlp_input``: also layer ``layer``'s ``b_O``."""
        check(0 <= layer <= self.cfg.n_layers, f"layer must lie in [0, {self.cfg.n_layers}], got {layer}")
        check(not mlp_input or layer < self.cfg.n_layers, "mlp_input needs a layer below n_layers")
        total = torch.zeros(self.cfg.d_model, dtype=self.dtype, device=self.device)
        for i, block in enumerate(self.blocks[: layer + mlp_input]):
            if block.attn.b_O is not None:
                total = total + block.attn.b_O
            if include_mlp_biases and i < layer and block.mlp is not None:
                total = total + block.mlp.b_out
        return total

    def all_head_labels(self) -> list[str]:
        """``"L{layer}H{head}"`` for every head (original head indices), layer-major."""
        return [f"L{layer}H{head}" for layer, head in self.head_labels()]

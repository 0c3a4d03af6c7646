"""TransformerLens' configuration names on :class:`~headlens.model.config.ModelConfig`.

TransformerLens code (``patching``, ``head_detector``, ``evals``, ``ActivationCache``, users'
notebooks) reads ``model.cfg.d_vocab``, ``model.cfg.normalization_type``, ``model.cfg.device`` ...
Each such name here is a read-only alias of headlens' own field (``d_vocab`` is ``vocab_size``,
``n_key_value_heads`` is ``n_kv_heads`` ...), so there is one source of truth.

Four names are TransformerLens' run-time switches rather than architecture, and are plain
attributes (default False, never saved with the config): ``use_attn_result`` (every run caches
``hook_result``), ``use_split_qkv_input`` (``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``
``[B, P, H or K, D]``: one residual copy per head), ``use_attn_in`` (``hook_attn_in [B, P, H, D]``)
and ``use_hook_mlp_in`` (``hook_mlp_in [B, P, D]``). Set them with the model's ``set_use_*``
methods. ``device`` and ``dtype`` are the model's, kept current by the model.
"""
from __future__ import annotations

from typing import Optional

import torch

_NORMALIZATION = {"layernorm": "LN", "rmsnorm": "RMS", "none": None}
_ACT_FN = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu", "swiglu": "silu",
           "geglu": "gelu", "none": None}
_POSITIONAL = {"learned": "standard", "rotary": "rotary", "none": None}


class TLConfigNames:
    """Mixin for :class:`ModelConfig`: TransformerLens' names, computed from headlens' fields."""

    # run-time switches (instance attributes once set; not dataclass fields, so never saved)
    use_attn_result = False
    use_split_qkv_input = False
    use_attn_in = False
    use_hook_mlp_in = False
    # set by HeadlensModel.process_weights(fold_ln=True): norms then carry no weight (TL's LNPre)
    layer_norm_folding = False
    n_devices = 1

    @property
    def d_vocab(self) -> int:
        return self.vocab_size

    @property
    def d_vocab_out(self) -> int:
        return self.vocab_size

    @property
    def n_key_value_heads(self) -> Optional[int]:
        """Key/value heads under grouped-query attention; None for multi-head attention (as TL)."""
        return self.n_kv_heads if self.n_kv_heads != self.n_heads else None

    @property
    def eps(self) -> float:
        return self.norm_eps

    @property
    def attn_only(self) -> bool:
        return self.mlp == "none"

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def act_fn(self) -> Optional[str]:
        return _ACT_FN[self.mlp]

    @property
    def normalization_type(self) -> Optional[str]:
        """``"LN"`` / ``"RMS"`` (``"LNPre"`` / ``"RMSPre"`` once the norm weights are folded)."""
        kind = _NORMALIZATION[self.norm]
        return kind + "Pre" if kind and self.layer_norm_folding else kind

    @property
    def uses_rms_norm(self) -> bool:
        return self.norm == "rmsnorm"

    @property
    def final_rms(self) -> bool:
        return self.norm == "rmsnorm"

    @property
    def positional_embedding_type(self) -> Optional[str]:
        return _POSITIONAL[self.positional]

    @property
    def parallel_attn_mlp(self) -> bool:
        return self.parallel_block

    @property
    def attention_dir(self) -> str:
        return "causal" if self.causal else "bidirectional"

    @property
    def window_size(self) -> Optional[int]:
        return self.sliding_window

    @property
    def use_local_attn(self) -> bool:
        return self.sliding_window is not None

    @property
    def original_architecture(self) -> str:
        return self.family

    @property
    def model_name(self) -> str:
        return self.name

    @property
    def tie_word_embeddings(self) -> bool:
        return self.tie_embeddings

    @property
    def default_prepend_bos(self) -> bool:
        """Whether text gets a BOS token first: decoders that have one (as :func:`~headlens.model.tokens.encode`)."""
        return bool(self.causal and self.bos_token_id is not None)

    @property
    def device(self) -> torch.device:
        return self.__dict__.get("_device", torch.device("cpu"))

    @device.setter
    def device(self, value) -> None:
        self.__dict__["_device"] = torch.device(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.__dict__.get("_dtype", torch.float32)

    @dtype.setter
    def dtype(self, value) -> None:
        self.__dict__["_dtype"] = value

"""Phi-3 decoders (Phi-3, Phi-3.5, Phi-4-mini).

The LLaMA layout with fused projections: ``qkv_proj.weight [(H + 2K) * d, D]`` holds the queries,
then the keys, then the values (split by size), and ``gate_up_proj.weight [2F, D]`` the gate
then the up projection. Partial rotary (``partial_rotary_factor``), a sliding window on every
layer when ``sliding_window`` is set, no biases. ``longrope`` scaling (the 128k checkpoints),
whose frequencies depend on the sequence length, is refused by :func:`rotary_fields`.

The fused split depends on each layer's head counts, so the weight rules are written per layer
(a physically pruned layer has fewer heads).
"""
from __future__ import annotations

import torch

from headlens.errors import HeadlensError
from headlens.io.families.base import Family, merge_heads_in, merge_heads_out, register, split_heads_out
from headlens.io.families.llama import (
    GATED_MLPS,
    GATED_MLPS_TO_HF,
    hf_common,
    rope_parameters,
    rotary_fields,
    special_tokens,
    unembed_rules,
)
from headlens.model.config import ModelConfig


def config_from_hf(c) -> ModelConfig:
    if c.hidden_act not in GATED_MLPS:
        raise HeadlensError(f"hidden_act {c.hidden_act!r} is not supported for phi3: "
                            f"headlens reads {sorted(GATED_MLPS)}")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelConfig(
        family="phi3", n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        d_head=d_head, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size,
        causal=True, norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp=GATED_MLPS[c.hidden_act],
        qkv_bias=False, out_bias=False, mlp_bias=False, sliding_window=getattr(c, "sliding_window", None),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **rotary_fields(c, d_head, partial=True), **special_tokens(c),
    )


def split_qkv(n_q: int, n_kv: int, d: int):
    """``qkv_proj.weight [(n_q + 2 n_kv) d, D]`` -> ``(W_Q [D, n_q, d], W_K, W_V [D, n_kv, d])``."""
    def split(w: torch.Tensor) -> tuple:
        q, k, v = torch.split(w, [n_q * d, n_kv * d, n_kv * d])
        return tuple(t.T.reshape(w.shape[1], -1, d) for t in (q, k, v))
    return split


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    return torch.cat([merge_heads_in(t) for t in (q, k, v)])


def split_gate_up(w: torch.Tensor) -> tuple:
    """``gate_up_proj.weight [2F, D]`` -> ``(W_gate, W_in)`` weights ``[F, D]``."""
    return tuple(w.chunk(2))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up])


def weight_rules(cfg: ModelConfig) -> list:
    d = cfg.d_head
    rules = [("W_E.weight", "embed_tokens.weight", None),
             ("ln_final.weight", "norm.weight", None)]
    for layer in range(cfg.n_layers):  # the fused split needs this layer's head counts
        n_q, n_kv = len(cfg.heads_in_layer(layer)), len(cfg.kv_heads_in_layer(layer))
        rules.append((tuple(f"blocks.{layer}.attn.W_{n}" for n in "QKV"),
                      f"layers.{layer}.self_attn.qkv_proj.weight", split_qkv(n_q, n_kv, d), fuse_qkv))
    rules += [
        ("blocks.{l}.attn.W_O", "layers.{l}.self_attn.o_proj.weight", split_heads_out(cfg.n_heads, d),
         merge_heads_out),
        ("blocks.{l}.ln1.weight", "layers.{l}.input_layernorm.weight", None),
        ("blocks.{l}.ln2.weight", "layers.{l}.post_attention_layernorm.weight", None),
        (("blocks.{l}.mlp.W_gate.weight", "blocks.{l}.mlp.W_in.weight"), "layers.{l}.mlp.gate_up_proj.weight",
         split_gate_up, fuse_gate_up),
        ("blocks.{l}.mlp.W_out.weight", "layers.{l}.mlp.down_proj.weight", None),
    ]
    return rules + unembed_rules(cfg)


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` Phi3Config for ``cfg``."""
    import transformers

    rope = rope_parameters(cfg.rotary_base, cfg.rotary_scaling) | {
        "partial_rotary_factor": (cfg.rotary_dim or cfg.d_head) / cfg.d_head}
    return transformers.Phi3Config(
        **hf_common(cfg), hidden_act=GATED_MLPS_TO_HF[cfg.mlp], original_max_position_embeddings=cfg.n_ctx,
        rope_parameters=rope, sliding_window=cfg.sliding_window,
    )


PHI3 = register(Family(
    name="phi3", model_types=("phi3",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("model.", ""), hf_class="AutoModelForCausalLM", config_to_hf=config_to_hf,
    hf_layout=lambda cfg: ("Phi3ForCausalLM", "model."), head_names=("lm_head.",),
    description="Phi-3 decoders: LLaMA layout with fused qkv_proj and gate_up_proj (split by size), "
                "partial rotary, sliding window when set",
))

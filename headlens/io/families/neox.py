"""GPT-NeoX decoders (Pythia, GPT-NeoX-20B): LayerNorm, rotary on the first ``rotary_pct`` of
each head, parallel attention + MLP blocks (``use_parallel_residual``), untied output matrix
(``lm_head``; transformers 5 renames older checkpoints' ``embed_out`` on load).

The fused ``query_key_value`` weight ``[H * 3 * d, D]`` is interleaved per head: rows
``h*3d .. h*3d+d`` are head h's query, then its key, then its value.
"""
from __future__ import annotations

import torch

from headlens.errors import HeadlensError
from headlens.io.families.base import Family, merge_heads_out, register, split_heads_out, transpose
from headlens.io.families.llama import rotary_fields, special_tokens
from headlens.model.config import ModelConfig

MLPS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu",
        "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}


def config_from_hf(c) -> ModelConfig:
    d_head = c.hidden_size // c.num_attention_heads
    if c.hidden_act not in MLPS:
        raise HeadlensError(f"hidden_act {c.hidden_act!r} is not supported for gpt_neox: "
                            f"headlens reads {sorted(MLPS)}")
    bias = bool(getattr(c, "attention_bias", True))
    return ModelConfig(
        family="gpt_neox", n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, d_head=d_head, d_mlp=c.intermediate_size,
        n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size, causal=True,
        norm="layernorm", norm_eps=c.layer_norm_eps, parallel_block=bool(c.use_parallel_residual),
        mlp=MLPS[c.hidden_act], qkv_bias=bias, out_bias=bias, mlp_bias=True,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **rotary_fields(c, d_head, partial=True), **special_tokens(c),
    )


def split_qkv(d: int):
    """``query_key_value.weight [H*3*d, D]`` -> ``(W_Q, W_K, W_V)``, each ``[D, H, d]``; the bias
    ``[H*3*d]`` -> ``(b_Q, b_K, b_V)``, each ``[H, d]``."""
    def split(w: torch.Tensor) -> tuple:
        parts = w.reshape(-1, 3, d, *w.shape[1:]).unbind(1)  # 3 x [H, d(, D)]
        return tuple(p.permute(2, 0, 1) if w.ndim == 2 else p for p in parts)
    return split


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: ``[D, H, d]`` x 3 -> ``[H*3*d, D]``; ``[H, d]`` x 3 -> ``[H*3*d]``."""
    parts = [t.permute(1, 2, 0) if t.ndim == 3 else t for t in (q, k, v)]  # [H, d(, D)]
    return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[2:])


def weight_rules(cfg: ModelConfig) -> list:
    H, d = cfg.n_heads, cfg.d_head
    a = "layers.{l}.attention."
    rules = [("W_E.weight", "embed_in.weight", None),
             ("ln_final.weight", "final_layer_norm.weight", None),
             ("ln_final.bias", "final_layer_norm.bias", None)]
    rules.append((tuple(f"blocks.{{l}}.attn.W_{n}" for n in "QKV"), a + "query_key_value.weight",
                  split_qkv(d), fuse_qkv))
    if cfg.qkv_bias:
        rules.append((tuple(f"blocks.{{l}}.attn.b_{n}" for n in "QKV"), a + "query_key_value.bias",
                      split_qkv(d), fuse_qkv))
    rules.append(("blocks.{l}.attn.W_O", a + "dense.weight", split_heads_out(H, d), merge_heads_out))
    if cfg.out_bias:
        rules.append(("blocks.{l}.attn.b_O", a + "dense.bias", None))
    for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
        rules += [(f"blocks.{{l}}.{ours}.{p}", f"layers.{{l}}.{theirs}.{p}", None)
                  for p in ("weight", "bias")]
    for ours, theirs in (("W_in", "dense_h_to_4h"), ("W_out", "dense_4h_to_h")):
        rules += [(f"blocks.{{l}}.mlp.{ours}.{p}", f"layers.{{l}}.mlp.{theirs}.{p}", None)
                  for p in ("weight", "bias")]
    if not cfg.tie_embeddings:
        rules.append(("unembed.W_U", "lm_head.weight", transpose, transpose))
    return rules


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` GPTNeoXConfig for ``cfg`` (the unpruned shape)."""
    import transformers

    rope = {"rope_theta": cfg.rotary_base, "rope_type": "default",
            "partial_rotary_factor": (cfg.rotary_dim or cfg.d_head) / cfg.d_head}
    act = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.mlp]
    return transformers.GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, hidden_act=act,
        max_position_embeddings=cfg.n_ctx, layer_norm_eps=cfg.norm_eps, rope_parameters=rope,
        use_parallel_residual=cfg.parallel_block, attention_bias=cfg.qkv_bias,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def hf_layout(cfg: ModelConfig) -> tuple:
    return "GPTNeoXForCausalLM", "gpt_neox."


GPT_NEOX = register(Family(
    name="gpt_neox", model_types=("gpt_neox",), config_from_hf=config_from_hf,
    weight_rules=weight_rules, hf_prefixes=("gpt_neox.", ""),
    description="GPT-NeoX decoders (Pythia): parallel blocks, partial rotary, fused q/k/v",
    hf_class="AutoModelForCausalLM", config_to_hf=config_to_hf, hf_layout=hf_layout,
    head_names=("lm_head.",),
))

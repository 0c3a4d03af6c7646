"""OLMo 2 decoders.

The LLaMA layout with the norms moved: each sublayer's output is RMS-normalised before it joins the
residual stream (``post_attention_layernorm`` -> ``ln1_post``, ``post_feedforward_layernorm`` ->
``ln2_post``; no norm on the sublayer inputs: ``norm_position="output"``), the norm weight is
applied in float32, and a QK-norm runs over the whole query projection ``[H * head_dim]`` and key
projection ``[K * head_dim]`` before rotary (``qk_norm="projection"``).

That QK-norm couples the heads: every head's query is divided by an RMS taken over all heads'
projections. A head's output (``hook_z``, the gate, ablations, the fast sweep, gradients) is still
well defined and exact, but removing a head's weights changes the other heads' queries and keys,
so physical pruning refuses OLMo 2 models (a pruned model would not equal the gated one).

Hook points follow TransformerLens: ``blocks.{l}.hook_attn_out`` is after ``ln1_post`` (TL
#1648), ``blocks.{l}.attn.hook_out`` before it; ``attn.hook_q_normed`` / ``hook_k_normed`` are
the normalised queries / keys before rotary, ``[B, P, H, d]``.
"""
from __future__ import annotations

from headlens.errors import HeadlensError
from headlens.io.families.base import (
    Family,
    merge_bias,
    merge_heads_in,
    merge_heads_out,
    register,
    split_bias,
    split_heads_in,
    split_heads_out,
    transpose,
)
from headlens.io.families.llama import GATED_MLPS, rope_parameters, rotary_fields, special_tokens
from headlens.model.config import ModelConfig


def config_from_hf(c) -> ModelConfig:
    if c.hidden_act not in GATED_MLPS:
        raise HeadlensError(f"hidden_act {c.hidden_act!r} is not supported for olmo2: "
                            f"headlens reads {sorted(GATED_MLPS)}")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(
        family="olmo2", n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        d_head=d_head, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size,
        causal=True, norm="rmsnorm", norm_eps=c.rms_norm_eps, norm_position="output", norm_fp32_weight=True,
        mlp=GATED_MLPS[c.hidden_act], qkv_bias=bias, out_bias=bias, mlp_bias=False, qk_norm="projection",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **rotary_fields(c, d_head), **special_tokens(c),
    )


def weight_rules(cfg: ModelConfig) -> list:
    H, K, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    a, m = "layers.{l}.self_attn.", "layers.{l}.mlp."
    rules = [("W_E.weight", "embed_tokens.weight", None),
             ("ln_final.weight", "norm.weight", None)]
    for n, proj, heads in (("Q", "q_proj", H), ("K", "k_proj", K), ("V", "v_proj", K)):
        rules.append((f"blocks.{{l}}.attn.W_{n}", a + f"{proj}.weight", split_heads_in(heads, d),
                      merge_heads_in))
        if cfg.qkv_bias:
            rules.append((f"blocks.{{l}}.attn.b_{n}", a + f"{proj}.bias", split_bias(heads, d), merge_bias))
    rules.append(("blocks.{l}.attn.W_O", a + "o_proj.weight", split_heads_out(H, d), merge_heads_out))
    if cfg.out_bias:
        rules.append(("blocks.{l}.attn.b_O", a + "o_proj.bias", None))
    rules += [(f"blocks.{{l}}.attn.{n}_norm.weight", a + f"{n}_norm.weight", None) for n in "qk"]
    rules += [("blocks.{l}.ln1_post.weight", "layers.{l}.post_attention_layernorm.weight", None),
              ("blocks.{l}.ln2_post.weight", "layers.{l}.post_feedforward_layernorm.weight", None)]
    for ours, theirs in (("W_in", "up_proj"), ("W_gate", "gate_proj"), ("W_out", "down_proj")):
        rules.append((f"blocks.{{l}}.mlp.{ours}.weight", m + f"{theirs}.weight", None))
    if not cfg.tie_embeddings:
        rules.append(("unembed.W_U", "lm_head.weight", transpose, transpose))
    return rules


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` Olmo2Config for ``cfg``."""
    import transformers

    return transformers.Olmo2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        hidden_act={"swiglu": "silu", "geglu": "gelu"}[cfg.mlp], max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.norm_eps, rope_parameters=rope_parameters(cfg.rotary_base, cfg.rotary_scaling),
        attention_bias=cfg.qkv_bias, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


OLMO2 = register(Family(
    name="olmo2", model_types=("olmo2",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("model.", ""), hf_class="AutoModelForCausalLM", config_to_hf=config_to_hf,
    hf_layout=lambda cfg: ("Olmo2ForCausalLM", "model."), head_names=("lm_head.",),
    description="OLMo 2 decoders: RMSNorm after each sublayer, QK-norm over the whole projection "
                "(couples the heads: no physical pruning), SwiGLU, GQA",
))

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
    register,
)
from headlens.io.families.llama import (
    GATED_MLPS,
    GATED_MLPS_TO_HF,
    attention_rules,
    hf_common,
    mlp_rules,
    norm_rules,
    rope_parameters,
    rotary_fields,
    special_tokens,
)
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
    norms = [("ln1_post", "post_attention_layernorm"), ("ln2_post", "post_feedforward_layernorm")]
    return attention_rules(cfg) + norm_rules(norms) + mlp_rules(cfg)


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` Olmo2Config for ``cfg``."""
    import transformers

    return transformers.Olmo2Config(
        **hf_common(cfg), hidden_act=GATED_MLPS_TO_HF[cfg.mlp], attention_bias=cfg.qkv_bias,
        rope_parameters=rope_parameters(cfg.rotary_base, cfg.rotary_scaling),
    )


OLMO2 = register(Family(
    name="olmo2", model_types=("olmo2",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("model.", ""), hf_class="AutoModelForCausalLM", config_to_hf=config_to_hf,
    hf_layout=lambda cfg: ("Olmo2ForCausalLM", "model."), head_names=("lm_head.",),
    description="OLMo 2 decoders: RMSNorm after each sublayer, QK-norm over the whole projection "
                "(couples the heads: no physical pruning), SwiGLU, GQA",
))

"""Gemma 2 and Gemma 3 (text) decoders.

Both: four RMSNorms per block (``input_layernorm`` -> ``ln1``, ``post_attention_layernorm`` ->
``ln1_post``, ``pre_feedforward_layernorm`` -> ``ln2``, ``post_feedforward_layernorm`` ->
``ln2_post``: ``norm_position="sandwich"``), RMSNorm scale ``1 + weight`` applied in float32,
token embeddings multiplied by ``sqrt(hidden_size)``, attention scale
``query_pre_attn_scalar ** -0.5``, a GeGLU MLP with tanh GELU, grouped-query attention, tied
embeddings, and local (sliding-window) layers mixed with global ones by ``layer_types``.

======== =============================================== =============================================
family   attention                                       rotary
======== =============================================== =============================================
gemma2   scores soft-capped (``attn_logit_softcapping``); one base for every layer
         final logits soft-capped (``final_logit_softcapping``)
gemma3   per-head QK-norm (``q_norm`` / ``k_norm``, weights  per layer type: local layers
         ``[head_dim]``, also ``1 + weight``) before rotary; ``rope_parameters["sliding_attention"]``,
         no score soft-cap (transformers ignores           global ``["full_attention"]`` (each with
         ``attn_logit_softcapping``); final soft-cap if set  its own scaling)
======== =============================================== =============================================

Hook points follow TransformerLens: ``blocks.{l}.ln1_post`` / ``ln2_post`` are modules, and
``blocks.{l}.hook_attn_out`` / ``hook_mlp_out`` are taken after the post-norms (what is added to
the residual stream); ``blocks.{l}.attn.hook_out`` is the attention output before ``ln1_post``.
The post-attention norm makes the sublayer output non-linear in each head: the fast ablation
sweep applies its exact per-head change before that norm (see :mod:`headlens.importance.sweep`).

``model_type`` ``"gemma3"`` (the multimodal checkpoints) is not read; its text model is
``gemma3_text`` (``Gemma3ForCausalLM``).
"""
from __future__ import annotations

from headlens.errors import HeadlensError
from headlens.io.families.base import (
    Family,
    register,
)
from headlens.io.families.llama import (
    attention_layers,
    attention_rules,
    hf_common,
    layer_types_to_hf,
    mlp_rules,
    norm_rules,
    rope_parameters,
    rotary_fields,
    special_tokens,
)
from headlens.model.config import ModelConfig

ACTIVATIONS = {"gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh", "gelu": "geglu"}


def config_from_hf(c) -> ModelConfig:
    act = getattr(c, "hidden_activation", None) or c.hidden_act
    if act not in ACTIVATIONS:
        raise HeadlensError(f"hidden_activation {act!r} is not supported for {c.model_type}: "
                            f"headlens reads {sorted(ACTIVATIONS)}")
    if getattr(c, "use_bidirectional_attention", False):
        raise HeadlensError(f"this {c.model_type} checkpoint uses bidirectional attention (an "
                            "embedding model); headlens reads the causal Gemma decoders")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    gemma3 = c.model_type == "gemma3_text"
    if gemma3:  # rope parameters per layer type
        rope = rotary_fields(c, d_head, rope=c.rope_parameters["full_attention"])
        local = rotary_fields(c, d_head, rope=c.rope_parameters["sliding_attention"])
        rope |= dict(rotary_base_sliding=local["rotary_base"], rotary_scaling_sliding=local["rotary_scaling"])
    else:
        rope = rotary_fields(c, d_head)
    bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(
        family=c.model_type, n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, d_head=d_head,
        d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size, causal=True,
        norm="rmsnorm", norm_eps=c.rms_norm_eps, norm_position="sandwich", norm_offset=True,
        norm_fp32_weight=True, mlp=ACTIVATIONS[act], qkv_bias=bias, out_bias=bias, mlp_bias=False,
        attn_scale=float(c.query_pre_attn_scalar) ** -0.5, qk_norm="head" if gemma3 else "none",
        attn_scores_soft_cap=None if gemma3 else c.attn_logit_softcapping,
        output_logits_soft_cap=c.final_logit_softcapping, embed_scale=c.hidden_size ** 0.5,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        **attention_layers(c), **rope, **special_tokens(c),
    )


def weight_rules(cfg: ModelConfig) -> list:
    norms = [("ln1", "input_layernorm"), ("ln1_post", "post_attention_layernorm"),
             ("ln2", "pre_feedforward_layernorm"), ("ln2_post", "post_feedforward_layernorm")]
    return attention_rules(cfg) + norm_rules(norms) + mlp_rules(cfg)


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` Gemma2Config / Gemma3TextConfig for ``cfg`` (the unpruned shape)."""
    import transformers

    scalar = cfg.attn_scale ** -2
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
    common = hf_common(cfg) | dict(
        head_dim=cfg.d_head, hidden_activation={"geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu"}[cfg.mlp],
        attention_bias=cfg.qkv_bias, query_pre_attn_scalar=scalar, sliding_window=cfg.sliding_window,
        layer_types=layer_types_to_hf(cfg), final_logit_softcapping=cfg.output_logits_soft_cap,
    )
    if cfg.family == "gemma2":
        return transformers.Gemma2Config(**common, attn_logit_softcapping=cfg.attn_scores_soft_cap,
                                         rope_parameters=rope_parameters(cfg.rotary_base, cfg.rotary_scaling))
    local = (cfg.rotary_base, cfg.rotary_scaling) if cfg.rotary_base_sliding is None else \
        (cfg.rotary_base_sliding, cfg.rotary_scaling_sliding)
    rope = {"full_attention": rope_parameters(cfg.rotary_base, cfg.rotary_scaling),
            "sliding_attention": rope_parameters(*local)}
    return transformers.Gemma3TextConfig(**common, attn_logit_softcapping=None, rope_parameters=rope)


def hf_layout(cfg: ModelConfig) -> tuple:
    return {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[cfg.family], "model."


DESCRIPTIONS = {
    "gemma2": "Gemma 2 decoders: sandwich RMSNorms (1 + w), scaled embeddings, attention and final "
              "logit soft-capping, alternating local / global layers, GeGLU, GQA",
    "gemma3_text": "Gemma 3 text decoders: as Gemma 2 with per-head QK-norm instead of soft-capping and "
                   "separate rotary bases for local and global layers (layer_types)",
}

GEMMA2, GEMMA3 = (
    register(Family(
        name=name, model_types=(name,), config_from_hf=config_from_hf, weight_rules=weight_rules,
        hf_prefixes=("model.", ""), description=DESCRIPTIONS[name], hf_class="AutoModelForCausalLM",
        config_to_hf=config_to_hf, hf_layout=hf_layout, head_names=("lm_head.",),
    ))
    for name in ("gemma2", "gemma3_text")
)

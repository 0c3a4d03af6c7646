"""LLaMA-style decoders: LLaMA, Qwen2, Mistral and Qwen3 (and SmolLM2, a LLaMA).

Pre-RMSNorm blocks, rotary positions, a SwiGLU MLP, grouped-query attention (``num_key_value_heads``
key/value heads shared by groups of query heads). One weight map serves the four families; they
differ only in configuration:

======== ============================== ============================================ ==========
family   attention biases               sliding window                               QK-norm
======== ============================== ============================================ ==========
llama    q, k, v, o if attention_bias   none                                         no
qwen2    q, k, v (never o)              with use_sliding_window: the layers from     no
                                        ``max_window_layers`` on (``layer_types``)
mistral  none                           ``sliding_window`` on every layer            no
qwen3    q, k, v, o if attention_bias   as Qwen2                                     per head
======== ============================== ============================================ ==========

Qwen3's ``q_norm`` / ``k_norm`` (RMSNorm over each head's ``head_dim`` features, weights shared by
the heads) run before rotary; headlens hooks their outputs as ``attn.hook_q_normed`` /
``attn.hook_k_normed``.
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
from headlens.model.config import ModelConfig

GATED_MLPS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
GATED_MLPS_TO_HF = {"swiglu": "silu", "geglu": "gelu"}  # the way back, for export
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def rotary_fields(c, d_head: int, partial: bool = False, rope: dict | None = None) -> dict:
    """ModelConfig fields for the rotary embedding of a ``transformers`` config ``c`` (or of its
    ``rope`` parameters, when given: one layer type's entry of Gemma 3's per-type dict).

    ``partial``: honour ``partial_rotary_factor`` (GPT-NeoX's ``rotary_pct``; LLaMA ignores it)."""
    rope = dict(rope or getattr(c, "rope_parameters", None) or {})
    if "rope_theta" not in rope and hasattr(c, "rope_theta"):
        rope["rope_theta"] = c.rope_theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HeadlensError(f"rope_type {kind!r} of this checkpoint is not supported: headlens "
                            f"reproduces {list(ROPE_TYPES)}")
    factor = rope.get("partial_rotary_factor", 1.0) if partial else 1.0
    rotary_dim = int(d_head * factor)
    return dict(
        positional="rotary", rotary_base=float(rope.get("rope_theta", 10000.0)),
        rotary_dim=None if rotary_dim == d_head else rotary_dim,
        rotary_scaling=None if kind == "default" else
        {k: rope[k] for k in ROPE_SCALING_KEYS if k in rope} | {"rope_type": kind},
    )


def rope_parameters(base: float, scaling: dict | None) -> dict:
    """transformers' ``rope_parameters`` for a rotary ``base`` and ``scaling`` (inverse of
    :func:`rotary_fields`)."""
    return {"rope_theta": base, "rope_type": "default"} | (scaling or {})


def special_tokens(c) -> dict:
    """bos / eos / pad ids of ``c`` that lie inside the vocabulary (lists: the first)."""
    out = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t = getattr(c, name, None)
        t = t[0] if isinstance(t, (list, tuple)) and t else t
        out[name] = t if isinstance(t, int) and 0 <= t < c.vocab_size else None
    return out


def attention_layers(c) -> dict:
    """``sliding_window`` and ``layer_types`` of a ``transformers`` config: a window on every layer
    (Mistral, Phi-3: no ``layer_types``), on none, or per layer (``layer_types``: Qwen2's
    ``max_window_layers``, Gemma's alternating local / global layers)."""
    window = getattr(c, "sliding_window", None) or None
    types = list(getattr(c, "layer_types", None) or [])
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise HeadlensError(f"layer_types {sorted(unknown)} of this checkpoint are not supported: headlens "
                            "reads full_attention and sliding_attention layers")
    if window is None or not types or set(types) == {"sliding_attention"}:
        return dict(sliding_window=window, layer_types=None)
    if set(types) == {"full_attention"}:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=types)


def layer_types_to_hf(cfg: ModelConfig) -> list:
    """transformers' ``layer_types`` for ``cfg`` (inverse of :func:`attention_layers`)."""
    return ["full_attention" if cfg.sliding_window_of(layer) is None else "sliding_attention"
            for layer in range(cfg.n_layers)]


def config_from_hf(c) -> ModelConfig:
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    act = c.hidden_act
    if act not in GATED_MLPS:
        raise HeadlensError(f"hidden_act {act!r} is not supported for {c.model_type}: "
                            f"headlens reads {sorted(GATED_MLPS)}")
    if c.model_type == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    elif c.model_type == "mistral":
        qkv_bias = out_bias = mlp_bias = False
    else:
        qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
        mlp_bias = bool(getattr(c, "mlp_bias", False))
    layers = attention_layers(c) if c.model_type != "llama" else {}
    return ModelConfig(
        family=c.model_type, n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, n_kv_heads=getattr(c, "num_key_value_heads", None)
        or c.num_attention_heads, d_head=d_head, d_mlp=c.intermediate_size,
        n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size, causal=True,
        norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp=GATED_MLPS[act],
        qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias, **layers,
        qk_norm="head" if c.model_type == "qwen3" else "none", tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **rotary_fields(c, d_head), **special_tokens(c),
    )


def attention_rules(cfg: ModelConfig) -> list:
    """The rules every LLaMA-layout decoder shares: embeddings, the final norm, ``q/k/v/o_proj``
    (biases when the config has them) and the QK-norm weights (per head or over the projection)."""
    H, K, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    a = "layers.{l}.self_attn."
    rules = [("W_E.weight", "embed_tokens.weight", None),
             ("ln_final.weight", "norm.weight", None)]
    for n, proj, heads in (("Q", "q_proj", H), ("K", "k_proj", K), ("V", "v_proj", K)):
        rules.append((f"blocks.{{l}}.attn.W_{n}", a + f"{proj}.weight", split_heads_in(heads, d),
                      merge_heads_in))
        if cfg.qkv_bias:
            rules.append((f"blocks.{{l}}.attn.b_{n}", a + f"{proj}.bias", split_bias(heads, d),
                          merge_bias))
    rules.append(("blocks.{l}.attn.W_O", a + "o_proj.weight", split_heads_out(H, d), merge_heads_out))
    if cfg.out_bias:
        rules.append(("blocks.{l}.attn.b_O", a + "o_proj.bias", None))
    if cfg.qk_norm != "none":
        rules += [(f"blocks.{{l}}.attn.{n}_norm.weight", a + f"{n}_norm.weight", None) for n in "qk"]
    return rules


def norm_rules(pairs) -> list:
    """``[(ours, theirs)]`` block norm names -> rules (``blocks.{l}.ln1`` <- ``layers.{l}.input_layernorm``)."""
    return [(f"blocks.{{l}}.{ours}.weight", f"layers.{{l}}.{theirs}.weight", None) for ours, theirs in pairs]


def mlp_rules(cfg: ModelConfig) -> list:
    """The gated MLP's ``up/gate/down_proj`` (biases when set) and an untied ``lm_head``."""
    m, rules = "layers.{l}.mlp.", []
    for ours, theirs in (("W_in", "up_proj"), ("W_gate", "gate_proj"), ("W_out", "down_proj")):
        rules.append((f"blocks.{{l}}.mlp.{ours}.weight", m + f"{theirs}.weight", None))
        if cfg.mlp_bias:
            rules.append((f"blocks.{{l}}.mlp.{ours}.bias", m + f"{theirs}.bias", None))
    return rules + unembed_rules(cfg)


def unembed_rules(cfg: ModelConfig) -> list:
    return [] if cfg.tie_embeddings else [("unembed.W_U", "lm_head.weight", transpose, transpose)]


def weight_rules(cfg: ModelConfig) -> list:
    return attention_rules(cfg) + norm_rules([("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")]) \
        + mlp_rules(cfg)


def hf_common(cfg: ModelConfig) -> dict:
    """The ``transformers`` config fields every LLaMA-layout family names the same way."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def config_to_hf(cfg: ModelConfig):
    """A ``transformers`` config for ``cfg`` (the unpruned shape; export slices pruned heads)."""
    import transformers

    rope = rope_parameters(cfg.rotary_base, cfg.rotary_scaling)
    common = hf_common(cfg) | dict(head_dim=cfg.d_head, hidden_act=GATED_MLPS_TO_HF[cfg.mlp], rope_parameters=rope)
    if cfg.family in ("qwen2", "qwen3"):
        config = transformers.Qwen3Config if cfg.family == "qwen3" else transformers.Qwen2Config
        extra = dict(attention_bias=cfg.qkv_bias) if cfg.family == "qwen3" else {}
        return config(**common, **extra, use_sliding_window=cfg.sliding_window is not None,
                      sliding_window=cfg.sliding_window, max_window_layers=0,
                      layer_types=layer_types_to_hf(cfg))
    if cfg.family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=cfg.sliding_window)
    return transformers.LlamaConfig(**common, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def hf_layout(cfg: ModelConfig) -> tuple:
    name = {"qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}.get(cfg.family, "Llama")
    return f"{name}ForCausalLM", "model."


DESCRIPTIONS = {
    "llama": "LLaMA-style decoders (LLaMA 1-3, SmolLM2, TinyLlama): RMSNorm, rotary, SwiGLU, GQA",
    "qwen2": "Qwen2 / Qwen2.5 decoders: LLaMA layout with q/k/v biases",
    "mistral": "Mistral decoders: LLaMA layout with sliding-window attention",
    "qwen3": "Qwen3 decoders: LLaMA layout with per-head QK-norm before rotary, explicit head_dim",
}

LLAMA, QWEN2, MISTRAL, QWEN3 = (
    register(Family(
        name=name, model_types=(name,), config_from_hf=config_from_hf, weight_rules=weight_rules,
        hf_prefixes=("model.", ""), description=DESCRIPTIONS[name], hf_class="AutoModelForCausalLM",
        config_to_hf=config_to_hf, hf_layout=hf_layout, head_names=("lm_head.",),
    ))
    for name in ("llama", "qwen2", "mistral", "qwen3")
)

"""GPT-2: learned positions, pre-LayerNorm, GELU (tanh) MLP, Conv1D weights ``[in, out]``."""
from __future__ import annotations

from ..config import ModelConfig
from .base import Family, register


def config_from_hf(c) -> ModelConfig:
    return ModelConfig(
        family="gpt2", n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
        d_head=c.n_embd // c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=c.n_positions,
        vocab_size=c.vocab_size, causal=True, norm="layernorm", norm_eps=c.layer_norm_epsilon,
        mlp={"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(c.activation_function, "gelu_new"),
        positional="learned", tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        attn_scale=None if c.scale_attn_weights else 1.0,
        bos_token_id=c.bos_token_id if c.bos_token_id is not None and c.bos_token_id < c.vocab_size else None,
        eos_token_id=c.eos_token_id if c.eos_token_id is not None and c.eos_token_id < c.vocab_size else None,
    )


def weight_rules(cfg: ModelConfig) -> list:
    H, d, D = cfg.n_heads, cfg.d_head, cfg.d_model

    def qkv(i):  # Conv1D c_attn: weight [D, 3D], bias [3D]; q, k, v blocks
        return lambda w: w[:, i * D:(i + 1) * D].reshape(D, H, d)

    def qkv_bias(i):
        return lambda b: b[i * D:(i + 1) * D].reshape(H, d)

    a = "h.{l}.attn."
    rules = [
        ("W_E.weight", "wte.weight", None),
        ("W_pos.weight", "wpe.weight", None),
        ("ln_final.weight", "ln_f.weight", None),
        ("ln_final.bias", "ln_f.bias", None),
    ]
    for i, n in enumerate("QKV"):
        rules += [(f"blocks.{{l}}.attn.W_{n}", a + "c_attn.weight", qkv(i)),
                  (f"blocks.{{l}}.attn.b_{n}", a + "c_attn.bias", qkv_bias(i))]
    rules += [
        ("blocks.{l}.attn.W_O", a + "c_proj.weight", lambda w: w.reshape(H, d, D)),
        ("blocks.{l}.attn.b_O", a + "c_proj.bias", None),
        ("blocks.{l}.ln1.weight", "h.{l}.ln_1.weight", None),
        ("blocks.{l}.ln1.bias", "h.{l}.ln_1.bias", None),
        ("blocks.{l}.ln2.weight", "h.{l}.ln_2.weight", None),
        ("blocks.{l}.ln2.bias", "h.{l}.ln_2.bias", None),
        ("blocks.{l}.mlp.W_in.weight", "h.{l}.mlp.c_fc.weight", lambda w: w.T),
        ("blocks.{l}.mlp.W_in.bias", "h.{l}.mlp.c_fc.bias", None),
        ("blocks.{l}.mlp.W_out.weight", "h.{l}.mlp.c_proj.weight", lambda w: w.T),
        ("blocks.{l}.mlp.W_out.bias", "h.{l}.mlp.c_proj.bias", None),
    ]
    if not cfg.tie_embeddings:
        rules.append(("unembed.W_U", "lm_head.weight", lambda w: w.T))
    return rules


GPT2 = register(Family(
    name="gpt2", model_types=("gpt2",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("transformer.", "", "model."), description="GPT-2 causal decoders",
    hf_class="AutoModelForCausalLM",
))

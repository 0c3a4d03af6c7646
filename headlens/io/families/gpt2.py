"""GPT-2: learned positions, pre-LayerNorm, GELU (tanh) MLP, Conv1D weights ``[in, out]``.

transformers' GPT-2 stores Q, K and V fused in one Conv1D ``c_attn`` (weight ``[D, 3*H*d]``,
bias ``[3*H*d]``); headlens splits it per head and fuses it back on export.
"""
from __future__ import annotations

from headlens.errors import HeadlensError
from headlens.io.families.base import Family, mlp_activation, register, transpose
from headlens.model.config import ModelConfig


def config_from_hf(c) -> ModelConfig:
    mlp = mlp_activation(c.activation_function, "GPT-2 activation_function")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if getattr(c, flag, False):
            raise HeadlensError(f"GPT-2 checkpoints with {flag}=True are not supported")
    if c.n_embd % c.n_head:
        raise HeadlensError(f"GPT-2 n_embd ({c.n_embd}) must be a multiple of n_head ({c.n_head})")

    def token(t):
        return t if t is not None and 0 <= t < c.vocab_size else None

    return ModelConfig(
        family="gpt2", n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
        d_head=c.n_embd // c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=c.n_positions,
        vocab_size=c.vocab_size, causal=True, norm="layernorm", norm_eps=c.layer_norm_epsilon,
        mlp=mlp, positional="learned",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        attn_scale=None if c.scale_attn_weights else 1.0,
        bos_token_id=token(c.bos_token_id), eos_token_id=token(c.eos_token_id),
        pad_token_id=token(getattr(c, "pad_token_id", None)),
    )


def config_to_hf(cfg: ModelConfig):
    """The transformers ``GPT2Config`` of ``cfg`` (original head count if pruned)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.d_model, n_inner=cfg.d_mlp,
        n_positions=cfg.n_ctx, vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.norm_eps,
        activation_function=cfg.mlp, scale_attn_weights=cfg.attn_scale is None,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def weight_rules(cfg: ModelConfig) -> list:
    d = cfg.d_head

    def qkv(i):  # Conv1D c_attn weight [D, 3*H*d] -> the i-th third as [D, H, d]
        return lambda w: w.chunk(3, dim=-1)[i].reshape(w.shape[0], -1, d)

    def qkv_bias(i):  # [3*H*d] -> [H, d]
        return lambda b: b.chunk(3)[i].reshape(-1, d)

    def fuse(w):  # [D, H, d] -> one third of c_attn.weight, [D, H*d]
        return w.reshape(w.shape[0], -1)

    def fuse_bias(b):  # [H, d] -> [H*d]
        return b.reshape(-1)

    a = "h.{l}.attn."
    rules = [
        ("W_E.weight", "wte.weight", None),
        ("W_pos.weight", "wpe.weight", None),
        ("ln_final.weight", "ln_f.weight", None),
        ("ln_final.bias", "ln_f.bias", None),
    ]
    for i, n in enumerate("QKV"):  # Q, K, V order: export fuses the pieces in rule order
        rules += [(f"blocks.{{l}}.attn.W_{n}", a + "c_attn.weight", qkv(i), fuse),
                  (f"blocks.{{l}}.attn.b_{n}", a + "c_attn.bias", qkv_bias(i), fuse_bias)]
    rules += [
        ("blocks.{l}.attn.W_O", a + "c_proj.weight", lambda w: w.reshape(-1, d, w.shape[-1]),
         lambda w: w.reshape(-1, w.shape[-1])),
        ("blocks.{l}.attn.b_O", a + "c_proj.bias", None),
        ("blocks.{l}.ln1.weight", "h.{l}.ln_1.weight", None),
        ("blocks.{l}.ln1.bias", "h.{l}.ln_1.bias", None),
        ("blocks.{l}.ln2.weight", "h.{l}.ln_2.weight", None),
        ("blocks.{l}.ln2.bias", "h.{l}.ln_2.bias", None),
        ("blocks.{l}.mlp.W_in.weight", "h.{l}.mlp.c_fc.weight", transpose, transpose),
        ("blocks.{l}.mlp.W_in.bias", "h.{l}.mlp.c_fc.bias", None),
        ("blocks.{l}.mlp.W_out.weight", "h.{l}.mlp.c_proj.weight", transpose, transpose),
        ("blocks.{l}.mlp.W_out.bias", "h.{l}.mlp.c_proj.bias", None),
    ]
    if not cfg.tie_embeddings:
        rules.append(("unembed.W_U", "lm_head.weight", transpose, transpose))
    return rules


GPT2 = register(Family(
    name="gpt2", model_types=("gpt2",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("transformer.", "", "model."), description="GPT-2 causal decoders",
    hf_class="AutoModelForCausalLM", config_to_hf=config_to_hf,
    hf_layout=lambda cfg: ("GPT2LMHeadModel", "transformer."), head_names=("lm_head.",),
))

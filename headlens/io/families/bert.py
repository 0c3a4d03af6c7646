"""BERT-style encoders (BERT, MiniLM): post-LayerNorm, learned positions and segment embeddings,
padding masks; an MLM head when the checkpoint has one."""
from __future__ import annotations

from headlens.errors import HeadlensError
from headlens.io.families.base import (
    Family,
    merge_bias,
    merge_heads_in,
    merge_heads_out,
    mlp_activation,
    register,
    split_bias,
    split_heads_in,
    split_heads_out,
    transpose,
)
from headlens.model.config import ModelConfig


def config_from_hf(c) -> ModelConfig:
    has_mlm = any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining")
                  for a in (getattr(c, "architectures", None) or []))
    act = c.hidden_act if isinstance(c.hidden_act, str) else None
    mlp = mlp_activation(c.hidden_act, "BERT hidden_act")
    if has_mlm and act != "gelu":
        raise HeadlensError(f"BERT MLM heads with hidden_act {act!r} are not supported (only 'gelu')")
    position = getattr(c, "position_embedding_type", "absolute") or "absolute"
    if position != "absolute":
        raise HeadlensError(f"BERT position_embedding_type {position!r} is not supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if getattr(c, flag, False):
            raise HeadlensError(f"BERT checkpoints with {flag}=True are not supported")
    if c.hidden_size % c.num_attention_heads:
        raise HeadlensError(f"BERT hidden_size ({c.hidden_size}) must be a multiple of "
                            f"num_attention_heads ({c.num_attention_heads})")
    return ModelConfig(
        family="bert", n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size,
        causal=False, norm="layernorm", norm_eps=c.layer_norm_eps, norm_position="post",
        final_norm=False, mlp=mlp, positional="learned",
        n_token_types=c.type_vocab_size, embed_norm=True,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)) or not has_mlm,
        unembed="mlm" if has_mlm else "none", unembed_bias=has_mlm, pad_token_id=c.pad_token_id,
    )


def config_to_hf(cfg: ModelConfig):
    """The transformers ``BertConfig`` of ``cfg`` (original head count if pruned)."""
    from transformers import BertConfig

    act = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new", "silu": "silu"}.get(cfg.mlp, cfg.mlp)
    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, hidden_act=act,
        max_position_embeddings=cfg.n_ctx, type_vocab_size=cfg.n_token_types,
        layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, tie_word_embeddings=cfg.tie_embeddings,
    )


def hf_layout(cfg: ModelConfig) -> tuple:
    return ("BertForMaskedLM", "bert.") if cfg.unembed == "mlm" else ("BertModel", "")


def weight_rules(cfg: ModelConfig) -> list:
    H, d = cfg.n_heads, cfg.d_head
    e, a = "embeddings.", "encoder.layer.{l}.attention."
    rules = [
        ("W_E.weight", e + "word_embeddings.weight", None),
        ("W_pos.weight", e + "position_embeddings.weight", None),
        ("W_token_type.weight", e + "token_type_embeddings.weight", None),
        ("embed_ln.weight", e + "LayerNorm.weight", None),
        ("embed_ln.bias", e + "LayerNorm.bias", None),
    ]
    for n, hf in (("Q", "query"), ("K", "key"), ("V", "value")):
        rules += [(f"blocks.{{l}}.attn.W_{n}", a + f"self.{hf}.weight", split_heads_in(H, d), merge_heads_in),
                  (f"blocks.{{l}}.attn.b_{n}", a + f"self.{hf}.bias", split_bias(H, d), merge_bias)]
    rules += [
        ("blocks.{l}.attn.W_O", a + "output.dense.weight", split_heads_out(H, d), merge_heads_out),
        ("blocks.{l}.attn.b_O", a + "output.dense.bias", None),
        ("blocks.{l}.ln1.weight", a + "output.LayerNorm.weight", None),
        ("blocks.{l}.ln1.bias", a + "output.LayerNorm.bias", None),
        ("blocks.{l}.mlp.W_in.weight", "encoder.layer.{l}.intermediate.dense.weight", None),
        ("blocks.{l}.mlp.W_in.bias", "encoder.layer.{l}.intermediate.dense.bias", None),
        ("blocks.{l}.mlp.W_out.weight", "encoder.layer.{l}.output.dense.weight", None),
        ("blocks.{l}.mlp.W_out.bias", "encoder.layer.{l}.output.dense.bias", None),
        ("blocks.{l}.ln2.weight", "encoder.layer.{l}.output.LayerNorm.weight", None),
        ("blocks.{l}.ln2.bias", "encoder.layer.{l}.output.LayerNorm.bias", None),
    ]
    if cfg.unembed == "mlm":
        p = "cls.predictions."
        rules += [
            ("unembed.transform.weight", p + "transform.dense.weight", None),
            ("unembed.transform.bias", p + "transform.dense.bias", None),
            ("unembed.transform_ln.weight", p + "transform.LayerNorm.weight", None),
            ("unembed.transform_ln.bias", p + "transform.LayerNorm.bias", None),
            ("unembed.b_U", p + "bias", None),
        ]
        if not cfg.tie_embeddings:
            rules.append(("unembed.W_U", p + "decoder.weight", transpose, transpose))
    return rules


BERT = register(Family(
    name="bert", model_types=("bert",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("bert.", "", "model."), description="BERT-style encoders (BERT, MiniLM)",
    hf_class="AutoModel", config_to_hf=config_to_hf, hf_layout=hf_layout, head_names=("cls.",),
))

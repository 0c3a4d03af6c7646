"""BERT-style encoders (BERT, MiniLM): post-LayerNorm, learned positions and segment embeddings,
padding masks; an MLM head when the checkpoint has one."""
from __future__ import annotations

from ..config import ModelConfig
from .base import Family, register, split_bias, split_heads_in, split_heads_out


def config_from_hf(c) -> ModelConfig:
    has_mlm = any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining")
                  for a in (getattr(c, "architectures", None) or []))
    return ModelConfig(
        family="bert", n_layers=c.num_hidden_layers, d_model=c.hidden_size,
        n_heads=c.num_attention_heads, d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, vocab_size=c.vocab_size,
        causal=False, norm="layernorm", norm_eps=c.layer_norm_eps, norm_position="post",
        final_norm=False, mlp={"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new"}.get(c.hidden_act, "gelu"),
        positional="learned", n_token_types=c.type_vocab_size, embed_norm=True,
        tie_embeddings=True, unembed="mlm" if has_mlm else "none", unembed_bias=has_mlm,
        pad_token_id=c.pad_token_id,
    )


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
        rules += [(f"blocks.{{l}}.attn.W_{n}", a + f"self.{hf}.weight", split_heads_in(H, d)),
                  (f"blocks.{{l}}.attn.b_{n}", a + f"self.{hf}.bias", split_bias(H, d))]
    rules += [
        ("blocks.{l}.attn.W_O", a + "output.dense.weight", split_heads_out(H, d)),
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
    return rules


BERT = register(Family(
    name="bert", model_types=("bert",), config_from_hf=config_from_hf, weight_rules=weight_rules,
    hf_prefixes=("bert.", "", "model."), description="BERT-style encoders (BERT, MiniLM)",
    hf_class="AutoModel",
))

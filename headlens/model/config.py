"""Model configuration: one dataclass describes every supported architecture.

A model family (GPT-2, BERT, LLaMA, ...) is a choice of these fields plus a weight-name map
(see :mod:`headlens.io.families`), never a new model class.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch

from headlens.errors import HeadlensError
from headlens.model.tl_config import TLConfigNames

NORMS = ("layernorm", "rmsnorm", "none")
POSITIONALS = ("learned", "rotary", "none")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}
# the names the command line offers (every alias above is accepted too)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
MLPS = ("gelu", "gelu_new", "relu", "silu", "swiglu", "geglu", "geglu_tanh", "none")
# where the norms of a block sit, for a sublayer f (attention or MLP):
# pre x + f(ln(x)) (GPT-2, LLaMA); post ln(x + f(x)) (BERT); sandwich x + ln_post(f(ln(x)))
# (Gemma 2/3); output x + ln_post(f(x)) (OLMo 2)
NORM_POSITIONS = ("pre", "post", "sandwich", "output")
QK_NORMS = ("none", "head", "projection")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig(TLConfigNames):
    """Architecture of a headlens model.

    Shapes used throughout the docs: ``L = n_layers``, ``H = n_heads`` (query heads),
    ``K = n_kv_heads`` (key/value heads, ``H % K == 0``), ``D = d_model``, ``d = d_head``.
    TransformerLens' names for these fields (``d_vocab``, ``n_key_value_heads``, ``act_fn`` ...)
    are read-only aliases (:mod:`headlens.model.tl_config`).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int
    vocab_size: int
    d_mlp: int = 0
    n_kv_heads: Optional[int] = None
    family: str = "custom"
    causal: bool = True
    # block layout
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # one of NORM_POSITIONS
    norm_offset: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    norm_fp32_weight: bool = False  # RMSNorm multiplies by its weight before casting back (Gemma, OLMo 2)
    parallel_block: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
    final_norm: bool = True
    mlp: str = "gelu_new"
    # attention
    positional: str = "learned"
    rotary_dim: Optional[int] = None  # None: all of d_head
    rotary_base: float = 10000.0
    # rotary frequency scaling as in transformers' rope_parameters: None, {"rope_type": "linear",
    # "factor"} or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rotary_scaling: Optional[dict] = None
    # rotary of the sliding-window layers when it differs (Gemma 3's local layers); None: as above
    rotary_base_sliding: Optional[float] = None
    rotary_scaling_sliding: Optional[dict] = None
    attn_scale: Optional[float] = None  # None: 1/sqrt(d_head)
    # RMSNorm on queries and keys before rotary: "head" over each head's d_head features
    # (Qwen3, Gemma 3; weights [d]), "projection" over the whole projection (OLMo 2; weights
    # [H*d] and [K*d]: it couples the heads)
    qk_norm: str = "none"
    attn_scores_soft_cap: Optional[float] = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    sliding_window: Optional[int] = None
    # per layer "full_attention" or "sliding_attention" (transformers' layer_types); None: every
    # layer uses sliding_window (if any)
    layer_types: Optional[list[str]] = None
    # embeddings and output
    n_token_types: int = 0  # BERT segment embeddings
    embed_scale: Optional[float] = None  # token embeddings multiplied by this (Gemma: sqrt(d_model))
    embed_norm: bool = False  # BERT: LayerNorm after the embeddings
    tie_embeddings: bool = False
    unembed: str = "lm"  # "lm": logits, "mlm": BERT MLM transform + logits, "none": hidden states
    unembed_bias: bool = False
    output_logits_soft_cap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # tokens the analyses care about
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    sep_token_ids: list[int] = field(default_factory=list)
    # heads kept after physical pruning: per layer, the original indices of the query heads
    kept_heads: Optional[list[list[int]]] = None
    name: str = "model"
    source: str = ""
    notes: str = ""

    # run-time switch, not a field (never saved): "sdpa" runs torch's scaled_dot_product_attention in
    # every layer whose scores nothing reads, "eager" the explicit per-head path everywhere
    attn_implementation = "sdpa"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a config.json value of the wrong type, e.g. n_heads: "four"
            if not _is_a(getattr(self, f.name), str(f.type)):
                value = getattr(self, f.name)
                raise HeadlensError(f"invalid ModelConfig: {f.name} must be {_TYPE_WORDS.get(str(f.type), f.type)}, "
                                    f"got {type(value).__name__} {value!r:.40}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = [
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (self.n_heads >= 1, f"n_heads must be >= 1, got {self.n_heads}"),
            (self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.positional in POSITIONALS,
             f"positional must be one of {POSITIONALS}, got {self.positional!r}"),
            (self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}"),
            (self.norm_position in NORM_POSITIONS,
             f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}"),
            (self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}"),
            (self.layer_types is None or (len(self.layer_types) == self.n_layers
                                          and set(self.layer_types) <= set(LAYER_TYPES)),
             f"layer_types must give one of {LAYER_TYPES} for each of the {self.n_layers} layers, "
             f"got {self.layer_types!r}"),
            (self.layer_types is None or "sliding_attention" not in self.layer_types
             or bool(self.sliding_window),
             "layer_types has sliding_attention layers but sliding_window is not set"),
            (not (self.qk_norm == "projection" and self.kept_heads is not None),
             "qk_norm='projection' (OLMo 2) normalises the whole query/key projection, which couples "
             "the heads: a model without some heads would not equal the gated one"),
            (self.unembed in ("lm", "mlm", "none"),
             f"unembed must be 'lm', 'mlm' or 'none', got {self.unembed!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HeadlensError(f"invalid ModelConfig: {msg}")
        if self.kept_heads is not None:
            if len(self.kept_heads) != self.n_layers:
                raise HeadlensError("kept_heads must list the kept heads of every layer")
            self.kept_heads = [sorted(int(h) for h in hs) for hs in self.kept_heads]

    # --- derived -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def heads_in_layer(self, layer: int) -> list[int]:
        """Original indices of the query heads that layer ``layer`` still has."""
        if self.kept_heads is None:
            return list(range(self.n_heads))
        return list(self.kept_heads[layer])

    def kv_heads_in_layer(self, layer: int) -> list[int]:
        """Original indices of the key/value heads that layer ``layer`` still needs."""
        return sorted({h // self.group_size for h in self.heads_in_layer(layer)})

    def sliding_window_of(self, layer: int) -> Optional[int]:
        """The sliding window of layer ``layer`` (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window or None

    def rotary_of(self, layer: int) -> tuple:
        """``(base, scaling)`` of layer ``layer``'s rotary embedding."""
        if self.rotary_base_sliding is not None and self.sliding_window_of(layer) is not None:
            return self.rotary_base_sliding, self.rotary_scaling_sliding
        return self.rotary_base, self.rotary_scaling

    @property
    def n_heads_total(self) -> int:
        return sum(len(self.heads_in_layer(layer)) for layer in range(self.n_layers))

    @property
    def is_pruned(self) -> bool:
        return self.kept_heads is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HeadlensError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "Optional[int]": "an integer or null", "Optional[float]": "a number or null",
               "Optional[dict]": "an object or null", "list[int]": "a list of integers",
               "Optional[list[list[int]]]": "a list of lists of integers, or null"}


def _is_a(value, annotation: str) -> bool:
    """Whether ``value`` has the type a field's annotation (text, e.g. ``Optional[int]``) names."""
    if annotation.startswith("Optional["):
        return value is None or _is_a(value, annotation[len("Optional["):-1])
    if annotation.startswith("list["):
        return isinstance(value, (list, tuple)) and all(_is_a(v, annotation[len("list["):-1]) for v in value)
    if isinstance(value, bool):
        return annotation == "bool"
    return {"int": lambda: isinstance(value, numbers.Integral), "float": lambda: isinstance(value, numbers.Real),
            "str": lambda: isinstance(value, str), "dict": lambda: isinstance(value, dict),
            "bool": lambda: False}.get(annotation, lambda: True)()


def parse_dtype(dtype) -> Optional[torch.dtype]:
    """``None``, a floating ``torch.dtype`` or a name (``"float32"``, ``"bf16"``, ``"fp16"`` ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise HeadlensError(f"dtype must be a floating torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def parse_device(device) -> Optional[torch.device]:
    """``None`` or a device this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a
    ``torch.device``); anything else is a one-line :class:`HeadlensError` naming it."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise HeadlensError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    backend = {"mps": getattr(torch.backends, "mps", None)}.get(dev.type, getattr(torch, dev.type, None))
    if dev.type not in ("cpu", "meta") and not (backend is not None and backend.is_available()):
        raise HeadlensError(f"device {device!r} is not available on this machine "
                            f"(torch finds no {dev.type.upper()} device); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HeadlensError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


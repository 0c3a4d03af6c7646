"""A model family = a config map from a ``transformers`` config plus a weight-name map.

Each family module defines a :class:`Family` and calls :func:`register`. A weight map is a list
of rules ``(ours, theirs, transform, inverse)`` with ``{l}`` for the layer:

- ``ours``: the headlens parameter name (or a tuple of names, when one ``transformers`` tensor
  holds several of ours, e.g. GPT-NeoX's interleaved ``query_key_value``: then ``transform``
  returns a tuple, one tensor per name, and ``inverse`` takes one tensor per name);
- ``theirs``: the ``transformers`` name (or a tuple of names) it is read from;
- ``transform(*their_tensors) -> our_tensor`` (``None``: taken as it is);
- ``inverse(our_tensor) -> their_tensor`` (or a tuple, one per name in ``theirs``), optional; it
  is what :func:`invert_state_dict` (and :func:`headlens.io.to_hf.save_hf`) uses. ``None`` with
  ``transform=None`` means the identity; a rule with a transform but no inverse cannot be
  exported. When several rules write the same ``transformers`` tensor (GPT-2's fused ``c_attn``),
  their inverses return consecutive pieces that are concatenated along the last dimension, in
  rule order.

Transforms infer the number of heads from the tensor's shape (only ``d_head`` is fixed), so the
same rules read physically pruned checkpoints whose layers have fewer heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from headlens.errors import HeadlensError
from headlens.model.config import ModelConfig

Transform = Callable[..., torch.Tensor]
WeightRule = tuple  # (ours: str, theirs: str | tuple[str, ...], transform | None[, inverse | None])


@dataclass
class Family:
    """How to read one ``transformers`` architecture into a :class:`HeadlensModel` (and back)."""

    name: str
    model_types: Sequence[str]  # transformers' config.model_type values
    config_from_hf: Callable[[object], ModelConfig]
    weight_rules: Callable[[ModelConfig], list]  # cfg -> [(ours, theirs, transform[, inverse])]
    hf_prefixes: Sequence[str] = ("",)  # prefixes tried in front of the transformers names
    description: str = ""
    bridge_supported: bool = True
    hf_class: str = "AutoModelForCausalLM"  # class used to load a folder or hub name
    export: Optional[Callable] = None  # (model) -> transformers model, for saving checkpoints
    extra: dict = field(default_factory=dict)
    # export to a transformers folder: cfg -> transformers PretrainedConfig
    config_to_hf: Optional[Callable[[ModelConfig], object]] = None
    # cfg -> (transformers architecture class name, prefix of the base-model weight names)
    hf_layout: Optional[Callable[[ModelConfig], tuple]] = None
    # transformers names outside the base model (output heads); they take no prefix
    head_names: Sequence[str] = ()


FAMILIES: dict[str, Family] = {}

# transformers' activation names -> headlens' ModelConfig.mlp (gelu_pytorch_tanh is gelu_new up to ~1e-7)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu",
                  "silu": "silu", "swish": "silu"}


def mlp_activation(name, where: str) -> str:
    """headlens' ``mlp`` for the transformers activation ``name`` (``where`` names the config field
    in the error, e.g. ``"GPT-2 activation_function"``)."""
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise HeadlensError(f"{where} {name!r} is not supported; headlens reads {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise HeadlensError(f"unsupported architecture {model_type!r}: headlens reads {known}")


# --- transforms between transformers' layouts and headlens' per-head layout ---------------------
# n (the number of heads) is kept in the signatures for readability; it is inferred from shapes.

def split_heads_in(n: int, d: int) -> Transform:
    """nn.Linear weight ``[n*d, D]`` -> ``[D, n, d]``."""
    return lambda w: w.T.reshape(w.shape[1], -1, d)


def merge_heads_in(w: torch.Tensor) -> torch.Tensor:
    """``[D, n, d]`` -> nn.Linear weight ``[n*d, D]`` (inverse of :func:`split_heads_in`)."""
    return w.reshape(w.shape[0], -1).T


def split_heads_out(n: int, d: int) -> Transform:
    """nn.Linear weight ``[D, n*d]`` -> ``[n, d, D]``."""
    return lambda w: w.T.reshape(-1, d, w.shape[0])


def merge_heads_out(w: torch.Tensor) -> torch.Tensor:
    """``[n, d, D]`` -> nn.Linear weight ``[D, n*d]`` (inverse of :func:`split_heads_out`)."""
    return w.reshape(-1, w.shape[-1]).T


def split_bias(n: int, d: int) -> Transform:
    """bias ``[n*d]`` -> ``[n, d]``."""
    return lambda b: b.reshape(-1, d)


def merge_bias(b: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` -> bias ``[n*d]``."""
    return b.reshape(-1)


def transpose(w: torch.Tensor) -> torch.Tensor:
    return w.T


def unpack_rule(rule: WeightRule) -> tuple:
    """``(ours, theirs tuple, transform or None, inverse or None)``; identity rules invert to identity."""
    ours, theirs, fn = rule[:3]
    inverse = rule[3] if len(rule) > 3 else None
    if fn is None and inverse is None:
        inverse = _identity
    return ours, (theirs if isinstance(theirs, tuple) else (theirs,)), fn, inverse


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def convert_state_dict(family: Family, cfg: ModelConfig, hf_state: dict) -> dict:
    """Map a ``transformers`` state dict onto headlens names; every rule must find its tensors."""
    rules = family.weight_rules(cfg)
    prefix = _find_prefix(family, rules, hf_state)
    out = {}
    for rule, layers in _expand(rules, cfg.n_layers):
        ours, theirs, fn, _ = unpack_rule(rule)
        for l in layers:
            tensors = []
            for name in theirs:
                key = prefix + name.format(l=l)
                if key not in hf_state and name.format(l=l) in hf_state:
                    key = name.format(l=l)  # weights outside the base model (e.g. an MLM head)
                if key not in hf_state:
                    raise HeadlensError(
                        f"checkpoint is missing weight {key!r} needed by the {family.name} family "
                        "(wrong architecture, or a truncated checkpoint?)")
                tensors.append(hf_state[key])
            value = fn(*tensors) if fn is not None else tensors[0]
            if isinstance(ours, tuple):  # one transformers tensor read into several of ours
                out.update({o.format(l=l): v for o, v in zip(ours, value, strict=True)})
            else:
                out[ours.format(l=l)] = value
    return out


def hf_weight_names(family: Family, cfg: ModelConfig) -> set:
    """The ``transformers`` weight names (without prefix) that the family's rules read."""
    return {name.format(l=l) for rule, layers in _expand(family.weight_rules(cfg), cfg.n_layers)
            for name in unpack_rule(rule)[1] for l in layers}


def invert_state_dict(family: Family, cfg: ModelConfig, state: dict, prefix: str = "") -> dict:
    """Map a headlens state dict onto ``transformers`` names (the inverse of
    :func:`convert_state_dict`); base-model names get ``prefix``, :attr:`Family.head_names` not."""
    pieces: dict[str, list] = {}
    for rule, layers in _expand(family.weight_rules(cfg), cfg.n_layers):
        ours, theirs, _, inverse = unpack_rule(rule)
        if inverse is None:
            raise HeadlensError(f"the {family.name} family cannot export {ours!r}: its weight rule "
                                "has no inverse")
        for l in layers:
            keys = [o.format(l=l) for o in (ours if isinstance(ours, tuple) else (ours,))]
            for key in keys:
                if key not in state:
                    raise HeadlensError(f"model has no weight {key!r} needed by the {family.name} family")
            outs = inverse(*(state[key] for key in keys))
            outs = outs if isinstance(outs, tuple) else (outs,)
            for name, tensor in zip(theirs, outs, strict=True):
                name = name.format(l=l)
                if not any(name.startswith(h) for h in family.head_names):
                    name = prefix + name
                pieces.setdefault(name, []).append(tensor)
    return {k: (v[0] if len(v) == 1 else torch.cat(v, dim=-1)) for k, v in pieces.items()}


def _expand(rules, n_layers):
    for rule in rules:
        names = tuple(r if isinstance(r, tuple) else (r,) for r in rule[:2])
        names = names[0] + names[1]
        per_layer = any("{l}" in n for n in names)
        yield rule, (range(n_layers) if per_layer else [0])


def _find_prefix(family: Family, rules, hf_state: dict) -> str:
    probe = next(r for r in rules if "{l}" in str(r[1]))
    name = probe[1][0] if isinstance(probe[1], tuple) else probe[1]
    for prefix in family.hf_prefixes:
        if prefix + name.format(l=0) in hf_state:
            return prefix
    raise HeadlensError(
        f"checkpoint does not look like a {family.name} model: no weight named like "
        f"{name.format(l=0)!r} under prefixes {list(family.hf_prefixes)}")

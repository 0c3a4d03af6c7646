"""A model family = a config map from a ``transformers`` config plus a weight-name map.

Each family module defines a :class:`Family` and calls :func:`register`. A weight map is a list
of ``(headlens name, transformers name, transform)`` templates with ``{l}`` for the layer; the
transform turns the ``transformers`` tensor (or tensors: a tuple of names) into headlens' layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ..config import ModelConfig
from ..errors import HeadlensError

Transform = Callable[..., torch.Tensor]
WeightRule = tuple  # (ours: str, theirs: str | tuple[str, ...], transform | None)


@dataclass
class Family:
    """How to read one ``transformers`` architecture into a :class:`HeadlensModel`."""

    name: str
    model_types: Sequence[str]  # transformers' config.model_type values
    config_from_hf: Callable[[object], ModelConfig]
    weight_rules: Callable[[ModelConfig], list]  # cfg -> [(ours, theirs, transform)]
    hf_prefixes: Sequence[str] = ("",)  # prefixes tried in front of the transformers names
    description: str = ""
    bridge_supported: bool = True
    hf_class: str = "AutoModelForCausalLM"  # class used to load a folder or hub name
    export: Optional[Callable] = None  # (model) -> transformers model, for saving checkpoints
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise HeadlensError(f"unsupported architecture {model_type!r}: headlens reads {known}")


# --- transforms from transformers' layouts to headlens' per-head layout -------------------------

def split_heads_in(n: int, d: int) -> Transform:
    """nn.Linear weight ``[n*d, D]`` -> ``[D, n, d]``."""
    return lambda w: w.T.reshape(w.shape[1], n, d)


def split_heads_out(n: int, d: int) -> Transform:
    """nn.Linear weight ``[D, n*d]`` -> ``[n, d, D]``."""
    return lambda w: w.T.reshape(n, d, w.shape[0])


def split_bias(n: int, d: int) -> Transform:
    """bias ``[n*d]`` -> ``[n, d]``."""
    return lambda b: b.reshape(n, d)


def transpose(w: torch.Tensor) -> torch.Tensor:
    return w.T


def convert_state_dict(family: Family, cfg: ModelConfig, hf_state: dict) -> dict:
    """Map a ``transformers`` state dict onto headlens names; every rule must find its tensors."""
    rules = family.weight_rules(cfg)
    prefix = _find_prefix(family, rules, hf_state)
    out = {}
    for layer_rules, layers in _expand(rules, cfg.n_layers):
        for l in layers:
            ours, theirs, fn = layer_rules
            names = theirs if isinstance(theirs, tuple) else (theirs,)
            tensors = []
            for name in names:
                key = prefix + name.format(l=l)
                if key not in hf_state and name.format(l=l) in hf_state:
                    key = name.format(l=l)  # weights outside the base model (e.g. an MLM head)
                if key not in hf_state:
                    raise HeadlensError(
                        f"checkpoint is missing weight {key!r} needed by the {family.name} family "
                        "(wrong architecture, or a truncated checkpoint?)")
                tensors.append(hf_state[key])
            value = fn(*tensors) if fn is not None else tensors[0]
            out[ours.format(l=l)] = value
    return out


def _expand(rules, n_layers):
    for rule in rules:
        names = (rule[0],) + (rule[1] if isinstance(rule[1], tuple) else (rule[1],))
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

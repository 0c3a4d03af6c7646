"""Head bookkeeping: naming a selection of heads, finding a head in a (pruned) layer's tensors, and
the gate that removes some heads.

Heads are always named by ``(layer, original head index)``: after physical pruning a layer's
tensors hold fewer heads, and :func:`local_index` finds where an original head now sits.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from headlens.errors import check


def head_label(layer: int, head: int) -> str:
    """The one text form of a head, ``"layer.head"`` (e.g. ``"3.7"``): column names, figure
    labels, report tables."""
    return f"{int(layer)}.{int(head)}"


def resolve_heads(model, heads=None) -> list[tuple[int, int]]:
    """Normalise a head selection to a sorted list of ``(layer, original head)``.

    ``heads``: None (every head), ``(layer, head)``, a list of those (e.g. a cluster), or
    ``{layer: [heads] or None}`` (None: the whole layer)."""
    L = model.cfg.n_layers
    if heads is None:
        return model.head_labels()
    if isinstance(heads, dict):
        pairs = []
        for layer, hs in heads.items():
            check(str(layer).lstrip("-").isdigit() and 0 <= int(layer) < L,
                  f"layer {layer!r} is out of range: the model has layers 0..{L - 1}")
            hs = model.cfg.heads_in_layer(int(layer)) if hs is None else hs
            check(isinstance(hs, (list, tuple, set, range, np.ndarray)),
                  f"heads[{layer!r}] must be a list of head indices or None, got {type(hs).__name__}")
            pairs += [(int(layer), h) for h in hs]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, (int, np.integer)) for x in heads):
        pairs = [heads]
    else:
        check(hasattr(heads, "__iter__") and not isinstance(heads, (str, bytes)),
              f"heads must be None, a (layer, head) pair, a list of pairs or {{layer: [heads]}}, got {heads!r}")
        pairs = list(heads)
    out = set()
    for pair in pairs:
        check(isinstance(pair, (tuple, list)) and len(pair) == 2 and None not in map(_index, pair),
              f"a head must be a (layer, head) pair of integers, got {pair!r}")
        layer, head = _index(pair[0]), _index(pair[1])
        check(0 <= layer < L, f"head {(layer, head)}: layer {layer} is out of range (the model has layers 0..{L - 1})")
        kept = model.cfg.heads_in_layer(layer)
        check(head in kept, f"head {(layer, head)}: head {head} is out of range (layer {layer} has heads "
                            f"{kept if model.cfg.is_pruned else f'0..{model.cfg.n_heads - 1}'})")
        out.add((layer, head))
    check(len(out) > 0, "heads is empty: give at least one (layer, head)")
    return sorted(out)


def _index(x) -> Optional[int]:
    """``x`` as an int if it is one (an int, numpy int, integral float or digit string), else None."""
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, torch.Tensor) and x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        return int(x)
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return int(x)
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return None


def local_index(model, layer: int, head: int) -> int:
    """Position of original head ``head`` in layer ``layer``'s tensors (differs after pruning)."""
    return model.blocks[layer].attn.head_ids.index(head)


def gate_without(model, heads, dtype=torch.float32) -> torch.Tensor:
    """Head gate ``[L, max H]`` (local head order) that is 1 everywhere except 0 on ``heads``
    (original ``(layer, head)`` ids, see :func:`resolve_heads`)."""
    H = max(b.attn.n_heads for b in model.blocks)
    gate = torch.ones(model.cfg.n_layers, max(H, 1), dtype=dtype, device=model.device)
    for layer, head in resolve_heads(model, heads) if heads else []:
        gate[layer, local_index(model, layer, head)] = 0
    return gate




# the attention weights that hold one slice per head: (name, "q" or "kv" heads, head dimension)
HEAD_SLICES = (("W_Q", "q", 1), ("b_Q", "q", 0), ("W_K", "kv", 1), ("b_K", "kv", 0),
               ("W_V", "kv", 1), ("b_V", "kv", 0), ("W_O", "q", 0))


def keep_heads(model, kept: list):
    """A new model with only the heads ``kept[l]`` (original ids, a subset of each layer's heads)
    in each layer: query heads' slices of ``W_Q``, ``b_Q``, ``W_O`` are removed, and a key/value
    head's (``W_K``, ``W_V``, biases) once none of its query heads remains. Shares no tensor with
    ``model``; equals it with the other heads gated to 0."""
    from headlens.model.transformer import HeadlensModel

    cfg = model.cfg
    new_cfg = cfg.replace(kept_heads=kept)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        index = {"q": [attn.head_ids.index(h) for h in new_cfg.heads_in_layer(layer)],
                 "kv": [attn.kv_ids.index(j) for j in new_cfg.kv_heads_in_layer(layer)]}
        for name, kind, dim in HEAD_SLICES:
            key = f"blocks.{layer}.attn.{name}"
            if key in state:
                ids = torch.tensor(index[kind], dtype=torch.long, device=state[key].device)
                state[key] = state[key].index_select(dim, ids).contiguous()
    return HeadlensModel.from_state_dict(new_cfg, state, model.tokenizer).train(model.training)


def padded_state(model) -> dict:
    """``model``'s weights at the unpruned shape (``n_heads`` query and ``n_kv_heads`` key/value
    heads per layer), zero for every head physically pruned away: an unpruned model on this state
    computes what ``model`` computes (a zero ``W_O`` slice removes the head's output)."""
    cfg = model.cfg
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        index = {"q": (attn.head_ids, cfg.n_heads), "kv": (attn.kv_ids, cfg.n_kv_heads)}
        for name, kind, dim in HEAD_SLICES:
            key = f"blocks.{layer}.attn.{name}"
            if key in state:
                ids, n = index[kind]
                t = state[key]
                full = t.new_zeros(*t.shape[:dim], n, *t.shape[dim + 1:])
                state[key] = full.index_copy(dim, torch.tensor(ids, dtype=torch.long, device=t.device), t)
    return state

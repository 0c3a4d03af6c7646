"""One text's attention patterns, every head, made ready for a page.

Shapes: ``P`` query positions, ``S`` key positions (``S == P``), ``T`` the tokens shown.

The model runs on the first ``T`` tokens of the text (a text cut for the view is the model's
input, so every shown row is a full softmax); each head's ``[T, T]`` pattern is rounded to
``digits`` decimals, stored as integers ``round(p * 10**digits)`` (one byte each for
``digits <= 2``, two bytes little-endian for 3 or 4), the lower triangle only for causal models,
all heads concatenated in :meth:`HeadlensModel.head_labels` order, and base64-encoded.
``T`` is the smallest of the text's length, the model's context, ``max_tokens`` and what
``max_bytes`` allows for the chosen heads; the returned ``note`` says when and why it was cut.
"""
from __future__ import annotations

import base64
from numbers import Integral
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from headlens.errors import check
from headlens.model.heads import head_label
from headlens.model.tokens import encode
from headlens.model.transformer import HeadlensModel
from headlens.patterns.capture import capture_patterns

FORMAT = 1  # bump when the payload below changes form (the page script reads it)
Text = Union[str, Sequence[int], torch.Tensor]


def view_data(model, text: Text, layers: Optional[Sequence[int]] = None, max_tokens: int = 64,
              max_bytes: int = 1_500_000, digits: int = 3,
              head_notes: Optional[Mapping[tuple, str]] = None, title: Optional[str] = None) -> dict:
    """The viewer's payload (a JSON-able dict) for ``text`` on ``model``.

    text: one string, or one sequence of token ids (``[P]`` or ``[1, P]``; for models without a
    tokenizer). layers: the layers to show (default all). max_tokens: show at most this many
    tokens. max_bytes: at most this many bytes of packed pattern values (before base64), which
    may cut the text further. digits: decimals kept (1 to 4). head_notes: ``{(layer, head): text}``
    shown beside the chosen head (e.g. its role). title: the view's heading (default: the model's name).
    """
    check(isinstance(model, HeadlensModel),
          f"model must be a loaded HeadlensModel (headlens.load(name) gives one), got {type(model).__name__}")
    check(isinstance(max_tokens, Integral) and max_tokens >= 2, f"max_tokens must be an int >= 2, got {max_tokens!r}")
    check(isinstance(digits, Integral) and 1 <= digits <= 4, f"digits must be an int from 1 to 4, got {digits!r}")
    check(isinstance(max_bytes, Integral) and max_bytes > 0, f"max_bytes must be a positive int, got {max_bytes!r}")
    cfg = model.cfg
    heads = _chosen_heads(model, layers)
    batch, n_text = _tokens(model, text)
    width = 1 if digits <= 2 else 2
    fit = _tokens_in_budget(len(heads), cfg.causal, width, max_bytes)
    check(fit >= 2, f"max_bytes={max_bytes} does not hold even 2 tokens of {len(heads)} heads; "
                    "raise it or choose fewer layers")
    T = min(batch["input_ids"].shape[1], max_tokens, fit)
    batch = {k: v[:, :T] for k, v in batch.items()}
    pb = capture_patterns(model, batch)[0]
    index = [pb.heads.index(h) for h in heads]
    patterns = pb.patterns[0, index].double().cpu().numpy()  # [n_heads, T, T]
    check(bool(np.isfinite(patterns).all()), "the model's attention patterns hold NaN or infinite values")
    return dict(
        format=FORMAT, title=title or cfg.name, causal=bool(cfg.causal), sliding_window=cfg.sliding_window,
        tokens=_token_labels(model, batch["input_ids"][0].tolist()), n_text_tokens=n_text,
        note=_note(T, n_text, cfg.n_ctx, max_tokens, fit),
        layers=_layer_lists(heads), kv_group_size=int(cfg.group_size) if cfg.group_size > 1 else None,
        digits=int(digits), width=width, values=_pack(patterns, cfg.causal, digits, width),
        head_notes={head_label(layer, head): str(v) for (layer, head), v in (head_notes or {}).items()
                    if (int(layer), int(head)) in set(heads)})


def unpack(data: dict) -> np.ndarray:
    """The rounded patterns of a payload as ``[n_heads, T, T]`` floats (the page shows these)."""
    T, width = len(data["tokens"]), data["width"]
    raw = np.frombuffer(base64.b64decode(data["values"]), dtype="<u2" if width == 2 else "u1")
    n_heads = sum(len(h) for _, h in data["layers"])
    rows, cols = np.tril_indices(T) if data["causal"] else np.indices((T, T)).reshape(2, -1)
    out = np.zeros((n_heads, T, T))
    out[:, rows, cols] = raw.reshape(n_heads, -1) / 10 ** data["digits"]
    return out


def _chosen_heads(model, layers) -> list[tuple[int, int]]:
    L = model.cfg.n_layers
    if layers is None:
        layers = range(L)
    check(not isinstance(layers, (str, bytes)) and hasattr(layers, "__iter__"),
          f"layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    for layer in layers:
        check(isinstance(layer, Integral) and 0 <= layer < L, f"layers must hold ints in [0, {L}), got {layer!r}")
    chosen = set(layers)
    heads = [(layer, h) for layer, h in model.head_labels() if layer in chosen]
    check(len(heads) > 0, f"layers {layers} have no heads to show")
    return heads


def _tokens(model, text) -> tuple[dict, int]:
    """One sequence as a batch (up to the model's context) and the text's full length in tokens."""
    if isinstance(text, torch.Tensor):
        check(text.ndim == 1 or (text.ndim == 2 and text.shape[0] == 1),
              f"give one token sequence ([pos] or [1, pos]), got shape {tuple(text.shape)}")
        text = text.reshape(-1).tolist()
    if isinstance(text, str):
        batch = encode(model, [text], truncate=True)
        n = batch["input_ids"].shape[1]
        if n == model.cfg.n_ctx and model.tokenizer is not None:
            n = max(n, len(model.tokenizer(text)["input_ids"]))
        return batch, n
    check(isinstance(text, Sequence) and len(text) > 0 and all(isinstance(t, Integral) for t in text),
          "text must be one string or one sequence of token ids (the viewer shows one text at a time)")
    return encode(model, [list(text)], truncate=True), len(text)


def _tokens_in_budget(n_heads: int, causal: bool, width: int, max_bytes: int) -> int:
    """The most tokens whose packed patterns of ``n_heads`` heads fit in ``max_bytes``."""
    per_head = max_bytes // (n_heads * width)
    if causal:  # T (T + 1) / 2 values per head
        return int((np.sqrt(8 * per_head + 1) - 1) // 2)
    return int(np.sqrt(per_head))


def _note(T: int, n_text: int, n_ctx: int, max_tokens: int, fit: int) -> str:
    if T >= n_text:
        return ""
    why = [name for name, limit in ((f"max_tokens={max_tokens}", max_tokens), ("the model's context", n_ctx),
                                    ("the page-size budget (max_bytes)", fit)) if limit == T]
    return (f"Showing the first {T} of the text's {n_text} tokens, cut by {' and '.join(why)}; the model "
            f"was run on these {T} tokens alone.")


def _layer_lists(heads) -> list:
    """``[[layer, [head, ...]], ...]`` in order, for layers that have heads."""
    out = []
    for layer, head in heads:
        if not out or out[-1][0] != layer:
            out.append([layer, []])
        out[-1][1].append(head)
    return out


def _token_labels(model, ids: list[int]) -> list[str]:
    """Each token as text (TransformerLens' ``to_str_tokens``: the tokenizer's decoding of that
    token alone), or its id for a model without a tokenizer."""
    tok = model.tokenizer
    if tok is None:
        return [str(i) for i in ids]
    return [str(s) for s in tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)]


def _pack(patterns: np.ndarray, causal: bool, digits: int, width: int) -> str:
    """``patterns [n_heads, T, T]`` rounded to ``digits`` decimals, as base64 integers."""
    T = patterns.shape[-1]
    q = np.rint(np.clip(patterns, 0.0, 1.0) * 10 ** digits)
    if causal:
        rows, cols = np.tril_indices(T)
        q = q[:, rows, cols]
    return base64.b64encode(q.astype("<u2" if width == 2 else "u1").tobytes()).decode("ascii")

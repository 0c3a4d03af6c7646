"""Turning text (or token ids) into model input, and streaming a dataset in batches.

A *batch* is a dict with ``input_ids [B, P]`` and ``attention_mask [B, P]`` (1 = real token),
plus ``token_type_ids`` for encoders that have them.
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from headlens.errors import HeadlensError, check

Texts = Union[str, Sequence[str], torch.Tensor, Sequence[Sequence[int]]]


def _is_token_input(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    return len(data) > 0 and not isinstance(data[0], str)


def encode(model, texts: Texts, truncate: bool = False, max_length: Optional[int] = None,
           add_special_tokens: bool = True, prepend_bos: Optional[bool] = None,
           padding_side: str = "right") -> dict:
    """Tokenize ``texts`` for ``model``; returns a batch dict on the model's device.

    Token ids (a ``[B, P]`` tensor or lists of ints) pass through with a full attention mask
    (lists of unequal length are padded on ``padding_side``). Text longer than the model's
    context raises :class:`HeadlensError` unless ``truncate=True``. ``prepend_bos`` (text only):
    True puts the BOS token first when the tokenizer does not, False removes one the tokenizer
    put there (TransformerLens' meaning); default: True for decoders that have a BOS token.
    """
    cfg = model.cfg
    limit = min(max_length or cfg.n_ctx, cfg.n_ctx)
    if isinstance(texts, str):
        texts = [texts]
    check(texts is None or (hasattr(texts, "__len__") and hasattr(texts, "__getitem__")
                            and not isinstance(texts, Mapping)),
          f"texts must be a string, a list of strings or token ids, got {type(texts).__name__}")
    check(texts is not None and len(texts) > 0, "texts is empty: give at least one text or token sequence")
    if _is_token_input(texts):
        batch = _pad_ids(texts, pad_token(model, text=False), padding_side)
    else:
        ids = _text_ids(model, texts, add_special_tokens, prepend_bos)
        too_long = [i for i, x in enumerate(ids) if len(x) > limit]
        if too_long and not truncate:
            i = too_long[0]
            raise HeadlensError(
                f"text {i} is {len(ids[i])} tokens long, more than the context of {limit} tokens "
                f"({len(too_long)} text(s) too long); pass truncate=True (--truncate) to cut them")
        ids = [x[:limit] for x in ids]
        batch = _pad_ids(ids, pad_token(model, text=True), padding_side)
        if cfg.n_token_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    P = batch["input_ids"].shape[1]
    if P > limit:
        if not truncate:
            raise HeadlensError(f"sequence length {P} exceeds the model's context of {limit} tokens; "
                                "pass truncate=True (--truncate) to cut it")
        batch = {k: v[:, :limit] for k, v in batch.items()}
    V = cfg.vocab_size
    ids = batch["input_ids"]
    check(ids.numel() > 0 and ids.shape[1] > 0, "no tokens to run: every sequence is empty")
    check(int(ids.min()) >= 0 and int(ids.max()) < V,
          f"token ids must lie in [0, {V}); got ids from {int(ids.min())} to {int(ids.max())} "
          "(tokenizer and model do not match?)")
    return {k: v.to(model.device) for k, v in batch.items()}


def pad_token(model, text: bool) -> int:
    """The id :func:`encode` pads with: the model's pad token, else (for text) the tokenizer's, else 0."""
    cfg, tok = model.cfg, model.tokenizer
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    return (getattr(tok, "pad_token_id", None) or 0) if text else 0


def _text_ids(model, texts, add_special_tokens: bool = True, prepend_bos: Optional[bool] = None) -> list:
    """Token ids of each text as :func:`encode` makes them (special tokens, BOS), uncut."""
    cfg, tok = model.cfg, model.tokenizer
    if tok is None:
        raise HeadlensError("this model has no tokenizer: pass token ids instead of text")
    for i, t in enumerate(texts):
        check(isinstance(t, str), f"texts[{i}] must be a string, got {type(t).__name__}")
        check(t.strip() != "", f"texts[{i}] is empty")
    ids = [list(x) for x in tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    bos = cfg.bos_token_id
    check(not prepend_bos or bos is not None, "prepend_bos=True: this model has no BOS token")
    if prepend_bos is False and bos is not None:
        ids = [x[1:] if (len(x) > 1 and x[0] == bos) else x for x in ids]
    elif prepend_bos or (prepend_bos is None and cfg.causal and bos is not None):
        ids = [x if (x and x[0] == bos) else [bos] + x for x in ids]
    return ids


def text_lengths(model, texts, add_special_tokens: bool = True, prepend_bos: Optional[bool] = None) -> list[int]:
    """How many tokens :func:`encode` makes of each text (before any cut): ``[N]`` ints."""
    return [len(x) for x in _text_ids(model, list(texts), add_special_tokens, prepend_bos)]


def _pad_ids(seqs, pad_id: int, padding_side: str = "right") -> dict:
    check(padding_side in ("right", "left"), f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(seqs, torch.Tensor):
        check(seqs.ndim in (1, 2), f"token ids must be [pos] or [batch, pos], got shape {tuple(seqs.shape)}")
        ids = seqs[None] if seqs.ndim == 1 else seqs
        check(not ids.is_floating_point(), "token ids must be integers")
        return {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}
    for i, s in enumerate(seqs):
        check(hasattr(s, "__len__") and not isinstance(s, str)
              and all(isinstance(t, Integral) or (isinstance(t, torch.Tensor) and t.ndim == 0
                                                  and not t.is_floating_point()) for t in s),
              f"token sequence {i} must be a list of integer ids")
    lengths = [len(s) for s in seqs]
    check(min(lengths) > 0, "a token sequence is empty")
    P = max(lengths)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        at = slice(0, len(s)) if padding_side == "right" else slice(P - len(s), P)
        ids[i, at] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, at] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(model, data: Union[Texts, Iterable], batch_size: int = 16, **encode_kwargs) -> Iterator[dict]:
    """Yield encoded batches of at most ``batch_size`` items from ``data``.

    ``data``: texts, token ids (``[N, P]`` tensor or lists), or any iterable of texts (e.g. a
    generator reading a file lazily) — it is consumed in chunks, never held whole in memory.
    """
    check(isinstance(batch_size, Integral) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(data, str):
        data = [data]
    check(isinstance(data, (torch.Tensor, Iterable)),
          f"data must be texts, token ids or an iterable of texts, got {type(data).__name__}")
    if isinstance(data, torch.Tensor):
        check(data.ndim == 2, f"token ids must be [batch, pos], got shape {tuple(data.shape)}")
        check(data.shape[0] > 0, "the dataset is empty")
        for i in range(0, data.shape[0], batch_size):
            yield encode(model, data[i: i + batch_size], **encode_kwargs)
        return
    chunk, seen = [], 0
    for item in data:
        chunk.append(item)
        if len(chunk) == batch_size:
            seen += len(chunk)
            yield encode(model, chunk, **encode_kwargs)
            chunk = []
    if chunk:
        seen += len(chunk)
        yield encode(model, chunk, **encode_kwargs)
    if seen == 0:
        raise HeadlensError("the dataset is empty: no texts or token sequences to run")


def repeated_random_tokens(n_seqs: int, half_len: int, vocab_size: int, seed: int = 0,
                           bos_token_id: Optional[int] = None, low: int = 0,
                           exclude: Sequence[int] = ()) -> torch.Tensor:
    """Olsson et al.'s induction input: ``[BOS?, x, x]`` with ``x`` uniform random tokens.

    Returns ``[n_seqs, (1 if BOS) + 2 * half_len]`` long tensor; token ids drawn from
    ``[low, vocab_size)`` minus ``exclude`` (e.g. special tokens), deterministic under ``seed``.
    """
    check(n_seqs >= 1 and half_len >= 2, "need n_seqs >= 1 and half_len >= 2")
    allowed = torch.tensor([t for t in range(low, vocab_size) if t not in set(exclude)])
    check(len(allowed) >= 2, "fewer than two token ids to draw from")
    gen = torch.Generator().manual_seed(seed)
    x = allowed[torch.randint(0, len(allowed), (n_seqs, half_len), generator=gen)]
    seq = torch.cat([x, x], dim=1)
    if bos_token_id is not None:
        seq = torch.cat([torch.full((n_seqs, 1), bos_token_id, dtype=torch.long), seq], dim=1)
    return seq


def induction_tokens(model, n_seqs: int, seed: int = 0, max_half_len: int = 32) -> tuple[torch.Tensor, int]:
    """:func:`repeated_random_tokens` sized for ``model``: ``[BOS?, x, x]`` (BOS for decoders that
    have one), ``x`` as long as the context allows up to ``max_half_len``, drawn from the whole
    vocabulary without the special tokens. Returns ``(tokens [N, P], half_len)``; the default
    data and task of models without a tokenizer."""
    cfg = model.cfg
    bos = cfg.bos_token_id if cfg.causal else None
    half_len = min(max_half_len, (cfg.n_ctx - (bos is not None)) // 2)
    check(half_len >= 2, f"the context of {cfg.n_ctx} tokens is too short for repeated tokens")
    special = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, *cfg.sep_token_ids) if t is not None}
    tokens = repeated_random_tokens(n_seqs, half_len, cfg.vocab_size, seed=seed, bos_token_id=bos,
                                    exclude=sorted(special))
    return tokens, half_len

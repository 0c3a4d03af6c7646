"""Per-head attention-pattern scores over a dataset (Clark et al. 2019; Voita et al. 2019;
Olsson et al. 2022), one row per head.

Shapes: ``B`` batch, ``N`` all heads (layer-major), ``P`` queries, ``S`` keys, ``A`` a pattern.

Scores are means over the *real* query positions of the whole dataset (padding is excluded from
queries and keys; each query counts once, so longer texts weigh more):

==========================  ============================================================
score_previous_token        A[i, i-1] over queries i >= 1
score_next_token            A[i, i+1] over queries i <= T-2 (0 for causal models)
score_self                  A[i, i]
score_first_token           A[i, 0] (BOS / [CLS]) over queries i >= 1 (at i = 0 it is self)
score_separator             mass on [SEP] / EOS keys (``cfg.sep_token_ids``)
score_punctuation           mass on punctuation tokens (tokenizer vocabulary; 0 without one)
score_distance              sum_j A[i, j] |i - j| (mean attention distance, tokens)
score_entropy               -sum_j A[i, j] log A[i, j] (nats)
score_entropy_norm          entropy / log(#visible keys), over queries that see >= 2 keys
score_confidence            max_j A[i, j] (Voita et al.)
score_duplicate_token       A[i, i-T] from the second copy of [BOS?, x, x] (|x| = T)
score_induction             A[i, i-T+1] from the second copy of [BOS?, x, x] (Olsson et al.)
score_local                 mass within |i - j| <= window
peak_offset, score_peak_offset  the key offset j - i in [-max_offset, max_offset] with the
                            highest mean A[i, i + offset], and that mean
==========================  ============================================================

The duplicate-token and induction scores come from a probe of repeated random tokens
(:func:`headlens.model.tokens.repeated_random_tokens`, special and ``[unused]`` tokens excluded; an
encoder gets ``[CLS] x x [SEP]``), not from the dataset; ``induction=False`` leaves them NaN.

TransformerLens' head detector (:func:`detector_scores`, identical to
``transformer_lens.head_detector.detect_head`` with ``error_measure="mul"``) is a different
estimator of similar quantities: per sequence, ``sum(A * template) / sum(A)`` over the whole
T x T pattern, then an unweighted mean over sequences. As every row sums to 1, its
previous-token score of one sequence is ``(T-1)/T`` times the Clark-style mean above (row 0 has
no previous token but still counts in the denominator); ``exclude_bos`` / ``exclude_current_token``
zero the first column / diagonal *before* normalising, which turns it into a share of the
remaining mass. Its duplicate template is ``token_j == token_i, j < i`` and its induction template
``token_{j-1} == token_i, j <= i``, read on any text, where ours read the random-token probe.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd
import torch

from headlens.errors import check
from headlens.model.tokens import repeated_random_tokens
from headlens.patterns.capture import PatternBatch, iter_patterns, stream_head_stats

SCORE_COLUMNS = [
    "score_previous_token", "score_next_token", "score_self", "score_first_token",
    "score_separator", "score_punctuation", "score_distance", "score_entropy",
    "score_entropy_norm", "score_confidence", "score_duplicate_token", "score_induction",
    "score_local",
]
PROBE_COLUMNS = ["score_induction", "score_duplicate_token"]  # from the repeated-token probe
DETECTOR_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")


# --- token sets ------------------------------------------------------------------------------
def punctuation_token_mask(model) -> torch.Tensor:
    """``[V]`` bool: tokens that are punctuation only (Unicode category P*), word-piece markers
    (``##``, ``Ġ``, ``▁``) removed; special tokens excluded. All False without a tokenizer."""
    V, tok = model.cfg.vocab_size, model.tokenizer
    mask = torch.zeros(V, dtype=torch.bool)
    if tok is None:
        return mask
    n = min(V, len(tok))
    special = set(getattr(tok, "all_special_ids", []) or [])
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(n)))):
        if piece is None or i in special:
            continue
        if piece.startswith("##") and len(piece) > 2:
            piece = piece[2:]
        piece = piece.lstrip("Ġ▁Ċ")
        if piece and all(unicodedata.category(c).startswith("P") for c in piece):
            mask[i] = True
    return mask


def _probe_exclusions(tok) -> list[int]:
    """Special tokens and never-trained placeholders such as BERT's ``[unused12]``."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    placeholder = re.compile(r"^\[[^\]\s]+\]$|^<\|[^>]+\|>$")
    for token, i in tok.get_vocab().items():
        if placeholder.match(token):
            special.add(i)
    return sorted(special)


def probe_tokens(model, n_seqs: int = 32, half_len: int = 20, seed: int = 0):
    """Olsson et al.'s repeated random tokens for ``model``.

    Returns ``(ids [n_seqs, P], start, T)``: each row is ``[prefix?, x, x, suffix?]`` with ``x``
    of length ``T`` starting at ``start``. Prefix: BOS (decoders with one) or [CLS] (encoders);
    suffix: [SEP] for encoders. ``T = half_len`` unless the context is shorter.
    """
    cfg, tok = model.cfg, model.tokenizer
    prefix = cfg.bos_token_id if cfg.causal else getattr(tok, "cls_token_id", None)
    suffix = None if cfg.causal else getattr(tok, "sep_token_id", None)
    T = min(half_len, (cfg.n_ctx - (prefix is not None) - (suffix is not None)) // 2)
    check(T >= 2, f"the model's context ({cfg.n_ctx}) is too short for an induction probe")
    vocab = cfg.vocab_size if tok is None else min(cfg.vocab_size, len(tok))
    exclude = [] if tok is None else _probe_exclusions(tok)
    ids = repeated_random_tokens(n_seqs, T, vocab, seed=seed, bos_token_id=prefix, exclude=exclude)
    if suffix is not None:
        ids = torch.cat([ids, torch.full((n_seqs, 1), suffix, dtype=torch.long)], dim=1)
    return ids, int(prefix is not None), T


# --- per-batch statistics (vectorised over batch, heads, queries, keys) ----------------------
def _masked(values: torch.Tensor, valid: torch.Tensor) -> tuple:
    """``values [B, N, Q]``, ``valid [B, Q]`` -> per-example (totals [B, N], counts [B])."""
    v = valid.to(values.dtype)
    return torch.einsum("bnq,bq->bn", values, v), v.sum(-1)


def _offset(A: torch.Tensor, real: torch.Tensor, k: int) -> tuple:
    """Attention from query i to key i + k: values ``[B, N, P-|k|]`` and valid ``[B, P-|k|]``."""
    P = real.shape[1]
    values = torch.diagonal(A, offset=k, dim1=-2, dim2=-1)
    if k >= 0:
        return values, real[:, : P - k] & real[:, k:]
    return values, real[:, -k:] & real[:, : P + k]


def text_statistics(model, window: int = 3, max_offset: int = 8):
    """A statistic function (see :func:`headlens.patterns.capture.stream_head_stats`) computing every
    dataset score of a :class:`PatternBatch` at once: ``{column: (totals [B, N], counts [B])}``
    and ``offset_profile`` (``[B, N, 2 max_offset + 1]``)."""
    check(window >= 0, f"window must be >= 0, got {window}")
    check(max_offset >= 1, f"max_offset must be >= 1, got {max_offset}")
    sep_ids = torch.tensor(sorted(model.cfg.sep_token_ids or []), dtype=torch.long)
    punct = punctuation_token_mask(model)

    def statistics(pb: PatternBatch) -> dict:
        A, real, ids = pb.patterns, pb.query_mask, pb.input_ids
        B, N, P, S = A.shape
        dev = A.device
        pos = torch.arange(P, device=dev)
        dist = (pos[:, None] - pos[None, :]).abs().to(A.dtype)  # [P, S]
        offsets = {}  # k -> (totals [B, N], counts [B]) of the attention from query i to key i + k
        profile, profile_counts = A.new_zeros(B, N, 2 * max_offset + 1), A.new_zeros(B, 1, 2 * max_offset + 1)
        for c, k in enumerate(range(-max_offset, max_offset + 1)):
            if abs(k) < P:
                offsets[k] = _masked(*_offset(A, real, k))
                profile[:, :, c], profile_counts[:, 0, c] = offsets[k]
        out = {}
        for name, k in (("score_previous_token", -1), ("score_next_token", 1), ("score_self", 0)):
            out[name] = offsets[k] if k in offsets else (A.new_zeros(B, N), A.new_zeros(B))
        out["score_first_token"] = _masked(A[..., 0], real & (pos >= 1))
        is_sep = torch.isin(ids, sep_ids.to(dev)) & real
        out["score_separator"] = _masked(torch.einsum("bnps,bs->bnp", A, is_sep.to(A.dtype)), real)
        is_punct = punct.to(dev)[ids] & real
        out["score_punctuation"] = _masked(torch.einsum("bnps,bs->bnp", A, is_punct.to(A.dtype)), real)
        out["score_distance"] = _masked(torch.einsum("bnps,ps->bnp", A, dist), real)
        out["score_local"] = _masked(torch.einsum("bnps,ps->bnp", A, (dist <= window).to(A.dtype)), real)
        entropy = torch.special.entr(A).sum(-1)  # [B, N, P]
        out["score_entropy"] = _masked(entropy, real)
        n_visible = pb.head_visible().sum(-1)  # [B, 1 or N, P]
        out["score_entropy_norm"] = _masked(entropy / n_visible.clamp(min=2).log(),
                                            real & (n_visible.amax(1) > 1))
        out["score_confidence"] = _masked(A.amax(-1), real)
        out["offset_profile"] = (profile, profile_counts)
        return out

    return statistics


def probe_statistics(start: int, T: int):
    """Statistic for the repeated-token probe: ``score_induction`` (key i-T+1) and
    ``score_duplicate_token`` (key i-T) over the queries i of the second copy."""

    def statistics(pb: PatternBatch) -> dict:
        A = pb.patterns
        queries = pb.query_mask[:, start + T: start + 2 * T]
        ind = torch.diagonal(A, offset=-(T - 1), dim1=-2, dim2=-1)[..., start + 1: start + T + 1]
        dup = torch.diagonal(A, offset=-T, dim1=-2, dim2=-1)[..., start: start + T]
        return {"score_induction": _masked(ind, queries), "score_duplicate_token": _masked(dup, queries)}

    return statistics


# --- tables ----------------------------------------------------------------------------------
def scores_table(model, means: dict, max_offset: int = 8) -> pd.DataFrame:
    """One row per head from dataset means ``{column: [N]}`` (missing columns are NaN)."""
    heads = model.head_labels()
    df = pd.DataFrame(heads, columns=["layer", "head"])
    for column in SCORE_COLUMNS:
        value = means.get(column)
        df[column] = np.nan if value is None else np.asarray(value, dtype=float).reshape(len(heads))
    profile = means.get("offset_profile")
    if profile is not None:
        profile = torch.nan_to_num(torch.as_tensor(profile), nan=-1.0)
        best = profile.argmax(-1)
        df["peak_offset"] = (best - max_offset).numpy().astype(int)
        df["score_peak_offset"] = profile.gather(-1, best[:, None])[:, 0].numpy()
    return df.sort_values(["layer", "head"], ignore_index=True)


def probe_means(model, n_seqs: int = 32, half_len: int = 20, seed: int = 0, batch_size: int = 16) -> dict:
    """``{"score_induction": [N], "score_duplicate_token": [N]}`` on the repeated-token probe."""
    ids, start, T = probe_tokens(model, n_seqs, half_len, seed)
    acc = stream_head_stats(model, ids, {"probe": probe_statistics(start, T)}, batch_size, sort_by_length=False)
    return {name: acc.mean(name) for name in PROBE_COLUMNS}


def pattern_scores(model, data, batch_size: int = 16, seed: int = 0, induction: bool = True,
                   n_probe: int = 32, probe_len: int = 20, window: int = 3, max_offset: int = 8,
                   progress: bool = False, **encode_kwargs) -> pd.DataFrame:
    """Every head's pattern scores over ``data`` (texts, token ids or an iterable of texts),
    streamed in batches of ``batch_size``: a DataFrame with ``layer, head`` and the columns of
    :data:`SCORE_COLUMNS` (see the module docstring), plus ``peak_offset, score_peak_offset``.

    ``induction``: also run the repeated-random-token probe (``n_probe`` sequences of
    ``2 * probe_len`` tokens, drawn under ``seed``) for the induction and duplicate-token scores.
    """
    stats = {"text": text_statistics(model, window, max_offset)}
    acc = stream_head_stats(model, data, stats, batch_size, progress=progress, **encode_kwargs)
    means = acc.means()
    if induction:
        means.update(probe_means(model, n_probe, probe_len, seed, batch_size))
    return scores_table(model, means, max_offset)


# --- TransformerLens' head detector, same definition -----------------------------------------
def _check_detector_name(name: str) -> None:
    check(name in DETECTOR_NAMES, f"name must be one of {DETECTOR_NAMES}, got {name!r}")


def detector_templates(ids: torch.Tensor, name: str) -> torch.Tensor:
    """``ids [B, P]`` -> 0/1 templates ``[B, P, P]`` of ``transformer_lens.head_detector``."""
    _check_detector_name(name)
    B, P = ids.shape
    if name == "previous_token_head":
        return torch.diag(torch.ones(P - 1, device=ids.device), -1).expand(B, P, P)
    same = (ids[:, :, None] == ids[:, None, :]).float().tril(-1)  # token_j == token_i, j < i
    if name == "duplicate_token_head":
        return same
    shifted = torch.zeros(B, P, P, device=ids.device)
    shifted[:, :, 1:] = same[:, :, :-1]  # token_{j-1} == token_i, j <= i
    return shifted


def detector_scores(model, data, name: str, exclude_bos: bool = False, exclude_current_token: bool = False,
                    batch_size: int = 16, **encode_kwargs) -> pd.DataFrame:
    """TransformerLens' ``detect_head(model, seqs, name, exclude_bos=..., exclude_current_token=...,
    error_measure="mul")`` for every head: per sequence ``sum(A' * template) / sum(A')`` on its
    real (unpadded) T x T block, ``A'`` being A with the first column / diagonal zeroed if asked,
    then the mean over sequences. ``data``: texts or token ids (each row one sequence).
    Returns ``layer, head, detector_{name}``.
    """
    _check_detector_name(name)
    total, count = 0.0, 0
    for pb in iter_patterns(model, data, batch_size, **encode_kwargs):
        A, real = pb.patterns, pb.query_mask
        A = A * (real[:, None, :, None] & real[:, None, None, :])
        if exclude_bos:
            A[..., 0] = 0
        if exclude_current_token:
            A = A * (1 - torch.eye(A.shape[-1], device=A.device))
        template = detector_templates(pb.input_ids, name)
        per_seq = torch.einsum("bnps,bps->bn", A, template) / A.sum((-1, -2))
        total, count = total + per_seq.sum(0), count + per_seq.shape[0]
    df = pd.DataFrame(model.head_labels(), columns=["layer", "head"])
    df[f"detector_{name}"] = (total / count).cpu().numpy()
    return df.sort_values(["layer", "head"], ignore_index=True)


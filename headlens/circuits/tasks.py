"""Tasks with counterfactual inputs for circuit analyses, beyond the bundled contrast tasks.

:func:`induction_task`: Olsson et al.'s ``[BOS?, x, x]`` (random tokens ``x`` repeated; the metric is
the loss on the second copy, :class:`~headlens.importance.tasks.RepeatedHalfTask`) with the corrupted
input ``[BOS?, y, x]``, ``y`` the tokens of ``x`` in another order (a permutation without fixed
points): the same tokens occur before the second copy, so a head that merely copies tokens seen
earlier (what one layer can do) works equally on both inputs, and only induction -- which needs the
token *after* the earlier occurrence -- separates them. :func:`circuit_task` reads ``"induction"`` as that task and any
other name as :func:`headlens.importance.tasks.load_task` does.
"""
from __future__ import annotations

from typing import Optional

import torch

from headlens.errors import check
from headlens.importance.tasks import RepeatedHalfTask, load_task


def _allowed_tokens(model) -> torch.Tensor:
    cfg, tok = model.cfg, model.tokenizer
    special = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if t is not None}
    special |= set(cfg.sep_token_ids)
    if tok is not None:
        special |= set(getattr(tok, "all_special_ids", []) or [])
    vocab = cfg.vocab_size if tok is None else min(cfg.vocab_size, len(tok))
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    check(len(allowed) >= 2, "the vocabulary has fewer than two ordinary tokens to draw from")
    return allowed


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(n)`` without fixed points (one cycle through a random order)."""
    order = torch.randperm(n, generator=gen)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def induction_task(model, n_examples: int = 32, half_len: int = 20, seed: int = 0) -> RepeatedHalfTask:
    """``n_examples`` sequences ``[BOS?, x, x]`` (``|x| = half_len``, fewer if the context is short) with
    corrupted ``[BOS?, y, x]``, ``y`` a shuffled ``x``; deterministic under ``seed``. Decoders only."""
    cfg = model.cfg
    check(cfg.causal, f"the induction task needs a decoder: {cfg.name!r} sees the whole sequence")
    check(isinstance(n_examples, int) and n_examples >= 2, f"n_examples must be an int >= 2, got {n_examples!r}")
    bos = cfg.bos_token_id
    T = min(int(half_len), (cfg.n_ctx - (bos is not None)) // 2)
    check(T >= 2, f"the model's context ({cfg.n_ctx}) is too short for repeated random tokens")
    allowed = _allowed_tokens(model)
    gen = torch.Generator().manual_seed(seed)
    x = allowed[torch.randint(0, len(allowed), (n_examples, T), generator=gen)]
    y = torch.stack([row[derangement(T, gen)] for row in x])
    prefix = [] if bos is None else [torch.full((n_examples, 1), bos, dtype=torch.long)]
    clean = torch.cat(prefix + [x, x], dim=1)
    corrupted = torch.cat(prefix + [y, x], dim=1)
    return RepeatedHalfTask(clean, T, name="induction", corrupted=corrupted)


def circuit_task(name, model, n_examples: Optional[int] = None, seed: int = 0, **options):
    """A task by name for the circuit analyses: ``"induction"`` (see :func:`induction_task`) or
    anything :func:`headlens.importance.tasks.load_task` reads."""
    if isinstance(name, str) and name == "induction":
        return induction_task(model, n_examples or 32, seed=seed, **options)
    return load_task(name, model, n_examples=n_examples, **options)

"""Per-head long-context pattern scores, from a prefilled context and its clean continuation.

- ``sink_rate`` (Gu et al. 2024): the share of real query positions ``i >= 1`` whose attention
  to the first token exceeds ``eps = 0.3``; ``sink_mass``: the mean attention to it.
- ``retrieval_score`` (Wu et al. 2024): on the retrieval examples, the fraction of answer
  tokens the head copies: at the step that predicts answer token ``w`` (teacher forced), the
  model's top prediction is ``w``, and the head's top-attended key lies in the needle being
  asked for and holds ``w``. Its 95% CI is a percentile bootstrap over examples (copied / answer
  tokens, paired).

For a key/value head (a KV cache decision) the scores of its query heads are combined as a
kv head can stream only if all of them can: the smallest sink rate and the largest retrieval
score.

Shapes: ``N`` examples, ``L`` layers, ``H`` heads, ``R`` rows, ``P`` positions, ``S`` keys.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap

from headlens.importance.tasks import logits_from_hidden
from headlens.longcontext.decode import continue_from, prefill

SINK_EPS = 0.3


class PatternStats:
    """Per-example counts ``[N, L, H]`` collected from patterns of rows at absolute positions."""

    def __init__(self, model, task, eps: float = SINK_EPS):
        L, H, N = model.cfg.n_layers, max(b.attn.n_heads for b in model.blocks), len(task)
        self.task, self.eps = task, eps
        self.sink_hits = np.zeros((N, L, H))
        self.sink_mass = np.zeros((N, L, H))
        self.queries = np.zeros(N)
        self.points = {}  # (batch id, layer) -> [R, H, P] bool: head's top key is the needle copy of the next token
        self.copied = np.zeros((N, L, H))
        self.answer_tokens = np.zeros(N)

    def observe(self, layer: int, pattern: torch.Tensor, batch, offset: int) -> None:
        """``pattern [R, H, Q, S]`` of queries ``offset .. offset + Q - 1``."""
        R, H, Q, S = pattern.shape
        pos = torch.arange(offset, offset + Q, device=pattern.device)
        real = batch.inputs["attention_mask"][:, offset:offset + Q].bool() & (pos >= 1)[None]  # [R, Q]
        first = pattern[..., 0].float()  # [R, H, Q]
        rows = batch.examples.numpy()
        w = real[:, None].float()
        self.sink_hits[rows, layer, :H] += ((first > self.eps).float() * w).sum(-1).cpu().numpy()
        self.sink_mass[rows, layer, :H] += (first * w).sum(-1).cpu().numpy()
        if layer == 0:
            self.queries[rows] += real.sum(1).cpu().numpy()
        spans = [self.task.needle_span[int(i)] for i in batch.examples]
        if any(sp is not None for sp in spans):
            ids = batch.inputs["input_ids"]
            top = pattern.argmax(-1)  # [R, H, Q]
            nxt = ids[:, offset + 1:offset + Q + 1]
            nxt = torch.nn.functional.pad(nxt, (0, Q - nxt.shape[1]), value=-1)  # [R, Q]
            lo = torch.tensor([sp[0] if sp else -1 for sp in spans], device=ids.device)[:, None, None]
            hi = torch.tensor([sp[1] if sp else -1 for sp in spans], device=ids.device)[:, None, None]
            in_needle = (top >= lo) & (top < hi)
            same = ids.gather(1, top.flatten(1)).view(R, H, Q) == nxt[:, None]
            self.points[(id(batch), layer, offset)] = (in_needle & same, offset)

    def finish_batch(self, model, batch, hidden: torch.Tensor) -> None:
        """Count the copies of a batch once its final hidden states ``[R, P, D]`` are known."""
        where = self.task.scored(batch)  # [R, P]
        ids = batch.inputs["input_ids"]
        correct = torch.zeros_like(where)
        logits = logits_from_hidden(model, hidden[where])
        correct[where] = logits.argmax(-1) == torch.roll(ids, -1, 1)[where]
        rows = batch.examples.numpy()
        spans = [self.task.needle_span[int(i)] for i in batch.examples]
        retrieval = torch.tensor([sp is not None for sp in spans], device=ids.device)
        self.answer_tokens[rows] += (where.sum(1) * retrieval).cpu().numpy()
        for (bid, layer, offset), (points, off) in list(self.points.items()):
            if bid != id(batch):
                continue
            Q = points.shape[-1]
            ok = (correct & where)[:, off:off + Q] & retrieval[:, None]  # [R, Q]
            self.copied[rows, layer, :points.shape[1]] += (points & ok[:, None]).sum(-1).cpu().numpy()
            del self.points[(bid, layer, offset)]


@torch.no_grad()
def collect(model, task, batch_size: int = 4, eps: float = SINK_EPS):
    """Prefill ``task`` (a :class:`headlens.longcontext.tasks.LongContextTask`), run its clean
    continuation and collect the pattern statistics; returns ``(PatternStats, prefilled)``."""
    stats = PatternStats(model, task, eps)
    pre = prefill(model, task, batch_size, on_pattern=lambda layer, t, b: stats.observe(layer, t, b, 0))
    for p in pre:
        hooks = [(f"blocks.{layer}.attn.hook_pattern",
                  lambda t, hook, layer=layer, p=p: stats.observe(layer, t, p.batch, p.start))
                 for layer in range(model.cfg.n_layers)]
        hidden = continue_from(model, p, fwd_hooks=hooks)
        stats.finish_batch(model, p.batch, hidden)
    return stats, pre


def head_scores(model, stats: PatternStats, n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per query head: ``layer, head, kv_head, sink_rate, sink_mass, retrieval_score,
    retrieval_ci_low, retrieval_ci_high``."""
    rows, cfg = [], model.cfg
    q = max(stats.queries.sum(), 1)
    n_tok = stats.answer_tokens
    use = n_tok > 0
    lows, highs = {}, {}
    if n_bootstrap and use.sum() > 1:
        copied = stats.copied[use].reshape(int(use.sum()), -1).T  # [L*H, N']
        tokens = np.broadcast_to(n_tok[use], copied.shape)
        res = bootstrap((copied, tokens), lambda c, t, axis: c.sum(axis) / t.sum(axis), paired=True,
                        vectorized=True, axis=-1, n_resamples=n_bootstrap, method="percentile",
                        random_state=np.random.default_rng(seed))
        lows = res.confidence_interval.low.reshape(stats.copied.shape[1:])
        highs = res.confidence_interval.high.reshape(stats.copied.shape[1:])
    for layer in range(cfg.n_layers):
        for j, h in enumerate(model.blocks[layer].attn.head_ids):
            score = stats.copied[use, layer, j].sum() / max(n_tok[use].sum(), 1)
            lo = float(np.nan_to_num(lows[layer, j], nan=score)) if len(lows) else np.nan
            hi = float(np.nan_to_num(highs[layer, j], nan=score)) if len(highs) else np.nan
            rows.append(dict(layer=layer, head=h, kv_head=h // cfg.group_size,
                             sink_rate=stats.sink_hits[:, layer, j].sum() / q,
                             sink_mass=stats.sink_mass[:, layer, j].sum() / q,
                             retrieval_score=score, retrieval_ci_low=lo, retrieval_ci_high=hi))
    return pd.DataFrame(rows)


def kv_head_scores(heads: pd.DataFrame) -> pd.DataFrame:
    """One row per key/value head: ``layer, kv_head, query_heads`` ("0 1 2"), ``sink_rate`` (the
    smallest of its query heads'), ``retrieval_score`` (the largest)."""
    g = heads.groupby(["layer", "kv_head"], sort=True)
    return pd.DataFrame({
        "query_heads": g["head"].apply(lambda x: " ".join(str(int(h)) for h in sorted(x))),
        "sink_rate": g["sink_rate"].min(), "retrieval_score": g["retrieval_score"].max(),
    }).reset_index()

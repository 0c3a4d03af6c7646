"""Capturing every head's attention pattern, in memory or as streamed statistics.

Shapes: ``B`` batch, ``P`` query positions, ``S`` key positions (``S == P``), ``N`` all heads of
the model, layer-major in :meth:`HeadlensModel.head_labels` order, ``H_l`` the heads of layer l.

The patterns are read with a ``names_filter`` on ``blocks.{l}.attn.hook_pattern`` only (through
TransformerLens' ``run_with_cache``, which removes its hooks when it returns or raises); the
forward pass does no other extra work (``return_type=None`` skips the unembedding).

Two ways to use them:

- :func:`capture_patterns` keeps every batch's patterns (for figures, small data, tests);
- :func:`stream_head_stats` runs statistics functions on each batch and keeps only their running
  sums (:class:`HeadStatsAccumulator`), so memory does not grow with the dataset. It can also keep
  Poisson-bootstrap replicates of every statistic, for stability estimates in one pass.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from tqdm.auto import tqdm

from headlens.errors import HeadlensError, check
from headlens.model.tokens import batches
from headlens.model.transformer import visible_positions
from headlens.runtime import current_world

PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"


@dataclass
class PatternBatch:
    """The attention patterns of one batch, every head of every layer.

    ``input_ids [B, P]``, ``attention_mask [B, P]`` (1 = real token), ``patterns [B, N, P, S]``
    (rows sum to 1 on real queries; padded keys get 0), ``heads``: ``(layer, head)`` of the N
    heads, ``causal``: whether queries only see earlier keys, ``sliding_window``: each layer's
    window (a list, None for full attention; or one value for every layer).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    patterns: torch.Tensor
    heads: list
    causal: bool
    layer_sizes: list
    sliding_window: Optional[int] | list = None

    def layer(self, layer: int) -> torch.Tensor:
        """Patterns of one layer, ``[B, H_l, P, S]`` (a view)."""
        check(0 <= layer < len(self.layer_sizes), f"layer must be in [0, {len(self.layer_sizes)}), got {layer}")
        start = sum(self.layer_sizes[:layer])
        return self.patterns[:, start: start + self.layer_sizes[layer]]

    @property
    def query_mask(self) -> torch.Tensor:
        """``[B, P]`` bool: real (non-padding) query positions."""
        return self.attention_mask.bool()

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` number of real tokens of each sequence."""
        return self.attention_mask.sum(-1)

    def visible(self, layer: int = 0) -> torch.Tensor:
        """``[B, P, S]`` bool: keys a real query of layer ``layer`` may attend to (real keys;
        earlier ones, within the layer's sliding window if any, for causal models)."""
        real = self.query_mask
        vis = real[:, :, None] & real[:, None, :]
        window = self.sliding_window[layer] if isinstance(self.sliding_window, list) else self.sliding_window
        allowed = visible_positions(real.shape[1], self.causal, window, real.device)
        return vis & allowed if allowed is not None else vis

    def head_visible(self) -> torch.Tensor:
        """``[B, 1, P, S]`` (every layer alike) or ``[B, N, P, S]`` (layers with different
        sliding windows): :meth:`visible` for each head."""
        windows = self.sliding_window if isinstance(self.sliding_window, list) else [self.sliding_window]
        if len(set(windows)) <= 1:
            return self.visible()[:, None]
        per_layer = [self.visible(layer)[:, None].expand(-1, n, -1, -1) for layer, n in enumerate(self.layer_sizes)]
        return torch.cat(per_layer, dim=1)


def _layer_sizes(model) -> list:
    return [model.blocks[layer].attn.n_heads for layer in range(model.cfg.n_layers)]


def _length_sorted(model, data, chunk: int) -> Iterator:
    """Reorder ``data`` by token length within chunks of ``chunk`` items (less padding)."""
    it = iter(data)
    while True:
        items = list(itertools.islice(it, chunk))
        if not items:
            return
        if isinstance(items[0], str) and model.tokenizer is not None:
            lengths = [len(x) for x in model.tokenizer(items)["input_ids"]]
        elif isinstance(items[0], str):
            lengths = [0] * len(items)
        else:
            lengths = [len(x) for x in items]
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        yield from (items[i] for i in order)


def _batches(model, data, batch_size: int, sort_by_length: bool, **encode_kwargs) -> Iterator[dict]:
    check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(data, dict):  # one ready batch
        check("input_ids" in data, "a batch dict needs 'input_ids'")
        yield {k: v.to(model.device) for k, v in data.items()}
        return
    if sort_by_length and not isinstance(data, (torch.Tensor, str)):
        data = _length_sorted(model, data, 32 * batch_size)
    yield from batches(model, data, batch_size, **encode_kwargs)


def pattern_batch(model, batch: dict) -> PatternBatch:
    """Run one encoded batch and return every head's pattern (see :class:`PatternBatch`)."""
    n = model.cfg.n_layers
    names = [PATTERN_HOOK.format(layer=layer) for layer in range(n)]
    wanted = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in wanted, return_type=None)
    patterns = torch.cat([cache[name].float().to(model.device) for name in names], dim=1)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    return PatternBatch(batch["input_ids"], mask, patterns, model.head_labels(), model.cfg.causal, _layer_sizes(model),
                        [model.cfg.sliding_window_of(layer) for layer in range(n)])


def _n_batches(data, batch_size: int) -> Optional[int]:
    """How many batches ``data`` makes, when it knows its length (for the progress bar's ETA)."""
    if isinstance(data, dict):
        return 1
    if not isinstance(batch_size, int) or batch_size < 1:
        return None  # _batches says why
    try:
        n = data.shape[0] if isinstance(data, torch.Tensor) else (1 if isinstance(data, str) else len(data))
    except TypeError:  # a generator
        return None
    return -(-n // batch_size)


def iter_patterns(model, data, batch_size: int = 16, sort_by_length: bool = False,
                  progress: bool = False, **encode_kwargs) -> Iterator[PatternBatch]:
    """Yield a :class:`PatternBatch` per batch of ``data``.

    ``data``: texts, token ids (``[N, P]`` tensor or lists of ints), an iterable of texts (read
    lazily), or one batch dict. ``sort_by_length`` reorders items within chunks of
    ``32 * batch_size`` to cut padding (statistics do not depend on the order).
    ``encode_kwargs`` go to :func:`headlens.model.tokens.encode` (e.g. ``truncate=True``).
    """
    stream = _batches(model, data, batch_size, sort_by_length, **encode_kwargs)
    for batch in tqdm(stream, desc="patterns", unit="batch", total=_n_batches(data, batch_size), disable=not progress):
        yield pattern_batch(model, batch)


def capture_patterns(model, data, batch_size: int = 16, **kwargs) -> list[PatternBatch]:
    """Every batch's patterns kept in memory: a list of :class:`PatternBatch` in data order.

    ``batch.patterns`` is ``[B, N, P, S]`` (all layers' heads); ``batch.layer(l)`` is
    ``[B, H_l, P, S]``. For whole datasets prefer :func:`stream_head_stats`.
    """
    return list(iter_patterns(model, data, batch_size, **kwargs))


# A statistic maps a PatternBatch to (totals [B, ...], counts [B] or [B, ...]): per-example sums
# of some quantity and how many terms each sum has (or to a dict {name: (totals, counts)}).
# Its dataset mean is sum(totals) / sum(counts).
Statistic = Callable[[PatternBatch], tuple]


class HeadStatsAccumulator:
    """Running sums of per-example statistics (and optional Poisson-bootstrap replicates).

    ``add(name, totals [B, ...], counts [B] or [B, ...])`` after ``start_batch(B)``;
    ``mean(name)`` is ``sum(totals) / sum(counts)`` over everything added (``counts`` broadcast
    against ``totals``). With ``n_replicates = R > 0`` each example also gets R weights drawn
    from Poisson(1) (the online bootstrap), and ``replicate_means(name)`` ``[R, ...]`` holds the
    weighted means: resamples of the examples without keeping the examples. ``replicate_names``
    limits the replicates to those statistics (default: all).
    """

    def __init__(self, n_replicates: int = 0, seed: int = 0, replicate_names: Optional[Iterable[str]] = None):
        check(n_replicates >= 0, f"n_replicates must be >= 0, got {n_replicates}")
        self.n_replicates = n_replicates
        self.replicate_names = None if replicate_names is None else set(replicate_names)
        self.generator = torch.Generator().manual_seed(seed)
        self.totals: dict = {}
        self.counts: dict = {}
        self.rep_totals: dict = {}
        self.rep_counts: dict = {}
        self.n_examples = 0
        self._weights: Optional[torch.Tensor] = None

    def fresh(self) -> "HeadStatsAccumulator":
        """An empty accumulator of the same kind that draws its bootstrap weights from this one's
        generator (continuing its sequence)."""
        new = HeadStatsAccumulator(self.n_replicates, 0, self.replicate_names)
        new.generator = self.generator
        return new

    def merge(self, other: "HeadStatsAccumulator") -> None:
        """Add ``other``'s sums (of other examples) into this accumulator (not its example count)."""
        for mine, theirs in ((self.totals, other.totals), (self.counts, other.counts),
                             (self.rep_totals, other.rep_totals), (self.rep_counts, other.rep_counts)):
            for name, value in theirs.items():
                mine[name] = mine.get(name, 0) + value

    def start_batch(self, batch_size: int) -> None:
        self.n_examples += batch_size
        if self.n_replicates:
            rates = torch.ones(self.n_replicates, batch_size, dtype=torch.float64)
            self._weights = torch.poisson(rates, generator=self.generator)

    def add(self, name: str, totals: torch.Tensor, counts: torch.Tensor) -> None:
        totals, counts = totals.double().cpu(), counts.double().cpu()
        check(totals.shape[0] == counts.shape[0], f"statistic {name!r}: totals and counts disagree on the batch size")
        counts = counts.reshape(counts.shape + (1,) * (totals.ndim - counts.ndim))  # broadcasts
        self.totals[name] = self.totals.get(name, 0) + totals.sum(0)
        self.counts[name] = self.counts.get(name, 0) + counts.sum(0)
        if self.n_replicates and (self.replicate_names is None or name in self.replicate_names):
            w = self._weights
            check(w is not None and w.shape[1] == totals.shape[0], "call start_batch(B) before add()")
            self.rep_totals[name] = self.rep_totals.get(name, 0) + torch.tensordot(w, totals, dims=1)
            self.rep_counts[name] = self.rep_counts.get(name, 0) + torch.tensordot(w, counts, dims=1)

    def _known(self, name: str) -> None:
        if name not in self.totals:
            raise HeadlensError(f"no statistic named {name!r}; have {sorted(self.totals)}")

    def mean(self, name: str) -> torch.Tensor:
        """Dataset mean of statistic ``name`` (NaN where it has no terms)."""
        self._known(name)
        return self.totals[name] / self.counts[name]

    def means(self) -> dict:
        return {name: self.mean(name) for name in self.totals}

    def replicate_means(self, name: str) -> torch.Tensor:
        """``[R, ...]`` means of statistic ``name`` under each bootstrap replicate."""
        self._known(name)
        check(name in self.rep_totals, f"no bootstrap replicates of {name!r} (n_replicates={self.n_replicates}, "
                                       f"replicate_names={self.replicate_names})")
        return self.rep_totals[name] / self.rep_counts[name]


def stream_head_stats(model, data, statistics: Mapping[str, Statistic], batch_size: int = 16,
                      n_replicates: int = 0, seed: int = 0, progress: bool = False,
                      sort_by_length: bool = True, accumulator: Optional[HeadStatsAccumulator] = None,
                      **encode_kwargs) -> HeadStatsAccumulator:
    """Run ``statistics`` on every batch of ``data`` and accumulate them; patterns are dropped
    after each batch, so memory does not grow with the dataset.

    ``statistics``: ``{name: fn(PatternBatch) -> (totals [B, ...], counts [B] or [B, ...])}``; a
    function may instead return a dict ``{name: (totals, counts)}`` of several statistics at once.
    Returns the :class:`HeadStatsAccumulator` (``.mean(name)``, ``.replicate_means(name)``).
    In a multi-process job (:mod:`headlens.runtime.distributed`) every rank reads the data and
    runs the model on its share of the batches; the sums of all ranks are added on every rank.
    """
    check(len(statistics) > 0, "statistics is empty: give at least one {name: function}")
    acc = accumulator if accumulator is not None else HeadStatsAccumulator(n_replicates, seed)
    world = current_world()
    # several ranks: each runs its share of the batches into a fresh accumulator that draws the
    # bootstrap weights of every batch from acc's generator (so every rank draws the same ones)
    part = acc if world.size == 1 else acc.fresh()
    stream = _batches(model, data, batch_size, sort_by_length, **encode_kwargs)
    bar = tqdm(stream, desc="patterns", unit="batch", total=_n_batches(data, batch_size),
               disable=not progress or not world.is_main)

    def share() -> HeadStatsAccumulator:
        for i, batch in enumerate(bar):
            part.start_batch(batch["input_ids"].shape[0])
            if world.owner(i) != world.rank:
                continue
            pb = pattern_batch(model, batch)
            for name, fn in statistics.items():
                result = fn(pb)
                for key, (totals, counts) in (result.items() if isinstance(result, dict) else [(name, result)]):
                    part.add(key, totals, counts)
        return part

    parts = world.run_shards(share)
    if world.size > 1:
        for other in parts:
            acc.merge(other)
        acc.n_examples += part.n_examples
    return acc

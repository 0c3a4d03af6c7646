"""The task protocol: examples -> encoded batches -> one metric value per example.

A :class:`Task` holds examples and turns the model's final hidden states into a per-example
metric (so that ablation effects get bootstrap confidence intervals over examples). The analyses
run the model themselves (gated, hooked, resumed from a cached layer) and call
:meth:`Task.compute` on the result; :meth:`Task.evaluate` is the plain way to score a model.
The types of task are in :mod:`headlens.importance.tasks.types`; loading and the bundled tasks in
:mod:`headlens.importance.tasks`.

Shapes: ``N`` examples in the task, ``B`` examples in a batch, ``R`` model rows in a batch
(``R = B * rows_per_example``), ``P`` positions, ``D`` d_model, ``V`` vocabulary.
"""
from __future__ import annotations

import copy
from collections import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from headlens.errors import HeadlensError, check
from headlens.model.tokens import encode, pad_token


@dataclass
class TaskBatch:
    """Model input for ``B`` examples: ``inputs`` (``input_ids``/``attention_mask`` ``[R, P]``, ...),
    ``examples [B]`` (indices into the task), ``targets`` (task-specific tensors, first dim ``B``),
    ``corrupted`` (counterfactual inputs ``[R, P]`` for attribution patching, when the task has them)."""

    inputs: dict
    examples: torch.Tensor
    targets: dict = field(default_factory=dict)
    corrupted: Optional[dict] = None

    @property
    def n_rows(self) -> int:
        return self.inputs["input_ids"].shape[0]


def as_sequence(values) -> Sequence:
    """``values`` as a sequence: a list, tuple or a column read lazily from a file
    (:mod:`headlens.data.streams`) as it is, anything else as a list."""
    return values if isinstance(values, abc.Sequence) and not isinstance(values, str) else list(values)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: ``[R, P, D] -> [R, D]``."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., V]`` through the model's output head (in float32 or float64)."""
    if model.unembed is None:
        raise HeadlensError(f"this task needs a model with an output head (logits); "
                            f"{model.cfg.name!r} has none: use an embedding or fidelity task")
    logits = model.unembed(hidden, model.W_E)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def next_token_loss(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token: ``hidden [R, P, D]``, ``ids [R, P]`` -> ``[R, P-1]`` (position
    ``j`` predicts ``ids[:, j+1]``)."""
    logits = logits_from_hidden(model, hidden[:, :-1])  # [R, P-1, V]
    # classes on the contiguous last dim: over logits.transpose(1, 2) cross-entropy is ~3x slower
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return loss.view(ids.shape[0], -1)


class Task:
    """Base class. Subclasses set the class attributes, ``_fields`` (per-example lists), and
    implement :meth:`rows` and :meth:`score`; :meth:`prepare` may add targets."""

    task_type = "task"
    metric_name = "metric"
    higher_is_better = True
    needs_reference = False  # score() needs the unablated model's hidden states
    rows_per_example = 1
    _fields: tuple = ()

    def __init__(self, name: Optional[str] = None, max_tokens: Optional[int] = None):
        self.name = name or self.task_type
        self.max_tokens = max_tokens
        lengths = {f: len(getattr(self, f)) for f in self._fields if getattr(self, f) is not None}
        check(len(set(lengths.values())) <= 1,
              f"task {self.name!r}: " + ", ".join(f"{f} ({n})" for f, n in lengths.items())
              + " must have the same length")
        n = next(iter(lengths.values()), 0)
        check(n > 0, f"task {self.name!r} is empty: give at least one example")
        self.ids = list(range(n))  # original example indices (kept by subset/split)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, metric={self.metric_name!r})"

    # --- examples ---------------------------------------------------------------------------
    def rows(self, i: int) -> list:
        """The ``rows_per_example`` model inputs (texts or token ids) of example ``i``."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "Task":
        """A task of the examples ``indices`` (positions in this task)."""
        indices = [int(i) for i in indices]
        check(len(indices) > 0, f"subset of task {self.name!r} is empty")
        check(all(0 <= i < len(self) for i in indices), f"subset indices must lie in [0, {len(self)})")
        new = copy.copy(self)
        for f in self._fields:
            value = getattr(self, f)
            if value is not None:  # a column read lazily from a file stays lazy (a view of those records)
                setattr(new, f, value.take(indices) if hasattr(value, "take") else [value[i] for i in indices])
        new.ids = [self.ids[i] for i in indices]
        return new

    def split_positions(self, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The positions of :meth:`split`'s two parts, each sorted: ``([k], [N - k])``."""
        check(0 < fraction < 1, f"fraction must lie in (0, 1), got {fraction}")
        check(len(self) >= 2, f"task {self.name!r} has {len(self)} example(s): need 2 to split")
        order = np.random.default_rng(seed).permutation(len(self))
        k = min(max(1, round(fraction * len(self))), len(self) - 1)
        return np.sort(order[:k]), np.sort(order[k:])

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["Task", "Task"]:
        """Random split into (first, second) with ``fraction`` of the examples in the first."""
        first, second = self.split_positions(fraction, seed)
        return self.subset(first), self.subset(second)

    # --- model input ------------------------------------------------------------------------
    def prepare(self, model, inputs: dict, examples: Sequence[int]) -> tuple[dict, dict, Optional[dict]]:
        """Per-task targets (first dim ``B``) and corrupted inputs for the encoded rows of the
        examples at positions ``examples`` (``[B]``, positions in this task)."""
        return inputs, {}, None

    def encode_rows(self, model, rows: list, pad_to: Optional[int] = None) -> dict:
        kwargs = dict(add_special_tokens=not model.cfg.causal)
        if self.max_tokens is not None:
            kwargs.update(truncate=True, max_length=self.max_tokens)
        enc = encode(model, rows, **kwargs)
        P = enc["input_ids"].shape[1]
        if pad_to is not None and pad_to > P:
            pad = pad_token(model, text=isinstance(rows[0], str))
            enc = {k: F.pad(v, (0, pad_to - P), value=pad if k == "input_ids" else 0) for k, v in enc.items()}
        return enc

    def encode_examples(self, model, examples: Sequence[int], pad_to: Optional[int] = None) -> TaskBatch:
        """The batch of the examples at positions ``examples``, padded to ``pad_to`` positions."""
        examples = [int(i) for i in examples]
        rows = [r for i in examples for r in self.rows(i)]
        inputs, targets, corrupted = self.prepare(model, self.encode_rows(model, rows, pad_to), examples)
        return TaskBatch(inputs, torch.tensor(examples), targets, corrupted)

    def batches(self, model, batch_size: int = 16) -> "TaskBatches":
        """All examples in batches of ``batch_size``, every batch padded to one common length ``P``
        (a lazy sequence: see :class:`TaskBatches`)."""
        return TaskBatches(self, model, batch_size)

    # --- the metric -------------------------------------------------------------------------
    def score(self, model, hidden: torch.Tensor, batch: TaskBatch, reference=None) -> torch.Tensor:
        """``hidden [R, P, D]`` (final hidden states) -> metric per example ``[B]``."""
        raise NotImplementedError

    def compute(self, model, hidden: torch.Tensor, batch: TaskBatch, reference=None) -> torch.Tensor:
        """:meth:`score`, checked: one finite value per example."""
        values = torch.as_tensor(self.score(model, hidden, batch, reference))
        B = len(batch.examples)
        if values.ndim != 1 or values.shape[0] != B:
            raise HeadlensError(f"task {self.name!r}: the metric must give one value per example "
                                f"(shape [{B}]), got shape {tuple(values.shape)}")
        bad = ~torch.isfinite(values.detach())
        if bad.any():
            i = int(batch.examples[bad.nonzero()[0, 0]])
            raise HeadlensError(f"task {self.name!r}: metric {self.metric_name!r} is NaN or infinite "
                                f"for example {self.ids[i]}")
        return values

    @torch.no_grad()
    def reference(self, model, batch: TaskBatch) -> Optional[torch.Tensor]:
        """What :meth:`score` compares with: the unablated model's final hidden states ``[R, P, D]``
        for ``batch`` when the task needs them (fidelity), else None."""
        return model(batch.inputs, return_type="hidden") if self.needs_reference else None

    @torch.no_grad()
    def evaluate(self, model, head_gate=None, fwd_hooks=(), batch_size: int = 16, batches=None) -> np.ndarray:
        """Metric per example ``[N]`` of ``model`` run with ``head_gate`` and ``fwd_hooks``
        (TransformerLens ``(name, fn)`` pairs, removed afterwards); ``batches``: this task's
        :meth:`batches` for ``model``, when the caller already has them. In a multi-process job
        (:mod:`headlens.runtime.distributed`) the batches are shared out over the ranks."""
        from headlens.runtime import current_world

        batches = batches if batches is not None else self.batches(model, batch_size)

        def metric(i: int) -> torch.Tensor:
            batch = batches[i]
            ref = self.reference(model, batch)
            with model.hooks(fwd_hooks=list(fwd_hooks)):
                hidden = model(batch.inputs, head_gate=head_gate, return_type="hidden")
            return self.compute(model, hidden, batch, ref).double().cpu()

        return torch.cat(current_world().map(metric, len(batches))).numpy()


class TaskBatches(abc.Sequence):
    """A task's examples in batches: ``batches[i]`` is the :class:`TaskBatch` of examples
    ``i * batch_size ...``, padded to the common length ``P`` of the whole task (the longest
    example's), so that activations of different batches line up position by position.

    Creating it reads every example once (to find ``P`` and to check each batch, so bad input
    fails before an analysis starts); a batch is encoded again when it is read, unless the whole
    task holds at most ``CACHE_TOKENS`` tokens, when the encoded batches are kept. A task of any
    length thus never sits in memory encoded."""

    CACHE_TOKENS = 2 ** 22

    def __init__(self, task: Task, model, batch_size: int):
        check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size}")
        self.task, self.model, self.batch_size = task, model, batch_size
        self.n_examples = len(task)
        P, kept = 0, []
        for i in range(len(self)):
            batch = task.encode_examples(model, self._examples(i))
            P = max(P, batch.inputs["input_ids"].shape[1])
            kept.append(batch)
        self.P = P
        tokens = P * self.n_examples * task.rows_per_example
        self._cache = [self._padded(b) for b in kept] if tokens <= self.CACHE_TOKENS else None

    def _examples(self, i: int) -> range:
        return range(i * self.batch_size, min((i + 1) * self.batch_size, self.n_examples))

    def _padded(self, batch: TaskBatch) -> TaskBatch:
        if batch.inputs["input_ids"].shape[1] == self.P:
            return batch
        return self.task.encode_examples(self.model, batch.examples.tolist(), pad_to=self.P)

    def __len__(self) -> int:
        return -(-self.n_examples // self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        if self._cache is not None:
            return self._cache[i]
        return self.task.encode_examples(self.model, self._examples(i), pad_to=self.P)

    @property
    def rows_per_batch(self) -> int:
        """``R`` of a full batch."""
        return min(self.batch_size, self.n_examples) * self.task.rows_per_example

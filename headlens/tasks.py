"""Tasks: what "the model does well" means, as one number per example.

A :class:`Task` holds examples and turns the model's final hidden states into a per-example
metric (so that ablation effects get bootstrap confidence intervals over examples). The analyses
run the model themselves (gated, hooked, resumed from a cached layer) and call
:meth:`Task.compute` on the result; :meth:`Task.evaluate` is the plain way to score a model.

Shapes: ``N`` examples in the task, ``B`` examples in a batch, ``R`` model rows in a batch
(``R = B * rows_per_example``), ``P`` positions, ``D`` d_model, ``V`` vocabulary.

Kinds: :class:`LMLossTask` (next-token loss), :class:`MLMLossTask` (masked-token loss),
:class:`ContrastTask` (logit difference right - wrong at the answer position, IOI-style, or
accuracy), :class:`EmbeddingContrastTask` (cos(anchor, positive) - cos(anchor, negative) of
mean-pooled sentence embeddings), :class:`FidelityTask` (KL to the unablated model's output, or
cosine of its sentence embeddings) and :class:`CallableTask` (a user function).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import HeadlensError, check
from .tokens import encode

DATA = Path(__file__).resolve().parent / "data" / "tasks"


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


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: ``[R, P, D] -> [R, D]``."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., V]`` through the model's output head (in float32 or float64)."""
    if model.unembed is None:
        raise HeadlensError(f"this task needs a model with an output head (logits); "
                            f"{model.cfg.name!r} has none: use an embedding or fidelity task")
    logits = model.unembed(hidden, model.W_E.weight)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


class Task:
    """Base class. Subclasses set the class attributes, ``_fields`` (per-example lists), and
    implement :meth:`rows` and :meth:`score`; :meth:`prepare` may add targets."""

    kind = "task"
    metric_name = "metric"
    higher_is_better = True
    needs_reference = False  # score() needs the unablated model's hidden states
    rows_per_example = 1
    _fields: tuple = ()

    def __init__(self, name: Optional[str] = None, max_tokens: Optional[int] = None):
        self.name = name or self.kind
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
            if getattr(self, f) is not None:
                setattr(new, f, [getattr(self, f)[i] for i in indices])
        new.ids = [self.ids[i] for i in indices]
        return new

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["Task", "Task"]:
        """Random split into (first, second) with ``fraction`` of the examples in the first."""
        check(0 < fraction < 1, f"fraction must lie in (0, 1), got {fraction}")
        check(len(self) >= 2, f"task {self.name!r} has {len(self)} example(s): need 2 to split")
        order = np.random.default_rng(seed).permutation(len(self))
        k = min(max(1, round(fraction * len(self))), len(self) - 1)
        return self.subset(sorted(order[:k])), self.subset(sorted(order[k:]))

    # --- model input ------------------------------------------------------------------------
    def prepare(self, model, inputs: dict) -> tuple[dict, dict, Optional[dict]]:
        """Per-task targets (first dim ``N``) and corrupted inputs for the encoded rows."""
        return inputs, {}, None

    def encode_rows(self, model, rows: list, pad_to: Optional[int] = None) -> dict:
        kwargs = dict(add_special_tokens=not model.cfg.causal)
        if self.max_tokens is not None:
            kwargs.update(truncate=True, max_length=self.max_tokens)
        enc = encode(model, rows, **kwargs)
        P = enc["input_ids"].shape[1]
        if pad_to is not None and pad_to > P:
            pad = model.cfg.pad_token_id or 0
            enc = {k: F.pad(v, (0, pad_to - P), value=pad if k == "input_ids" else 0) for k, v in enc.items()}
        return enc

    def batches(self, model, batch_size: int = 16) -> list[TaskBatch]:
        """All examples, encoded once to one common length ``P`` and cut into batches."""
        check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size}")
        rows = [r for i in range(len(self)) for r in self.rows(i)]
        inputs, targets, corrupted = self.prepare(model, self.encode_rows(model, rows))
        r, out = self.rows_per_example, []
        for s in range(0, len(self), batch_size):
            e = min(s + batch_size, len(self))
            cut = (lambda d, a, b: None if d is None else {k: v[a:b] for k, v in d.items()})
            out.append(TaskBatch(cut(inputs, s * r, e * r), torch.arange(s, e), cut(targets, s, e),
                                 cut(corrupted, s * r, e * r)))
        return out

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
    def evaluate(self, model, head_gate=None, fwd_hooks=(), batch_size: int = 16, batches=None) -> np.ndarray:
        """Metric per example ``[N]`` of ``model`` run with ``head_gate`` and ``fwd_hooks``
        (TransformerLens ``(name, fn)`` pairs, removed afterwards); ``batches``: this task's
        :meth:`batches` for ``model``, when the caller already has them."""
        out = []
        for batch in batches if batches is not None else self.batches(model, batch_size):
            ref = model(batch.inputs, return_type="hidden") if self.needs_reference else None
            with model.hooks(fwd_hooks=list(fwd_hooks)):
                hidden = model(batch.inputs, head_gate=head_gate, return_type="hidden")
            out.append(self.compute(model, hidden, batch, ref).double().cpu())
        return torch.cat(out).numpy()


class _TextTask(Task):
    """Tasks over plain text lines (``texts``); long texts are cut to ``max_tokens``."""
    _fields = ("texts",)

    def __init__(self, texts: Sequence, name=None, max_tokens: Optional[int] = 64):
        self.texts = list(texts)
        super().__init__(name, max_tokens)

    def rows(self, i):
        return [self.texts[i]]


class LMLossTask(_TextTask):
    """Mean next-token cross-entropy per text (decoders), padding excluded. Lower is better."""
    kind, metric_name, higher_is_better = "lm", "lm_loss", False

    def prepare(self, model, inputs):
        short = (inputs["attention_mask"].sum(1) < 2).nonzero()[:, 0].tolist()
        check(not short, f"task {self.name!r}: text {self.ids[short[0]] if short else ''} has fewer "
                         "than 2 tokens: no next token to predict")
        return inputs, {}, None

    def score(self, model, hidden, batch, reference=None):
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        logits = logits_from_hidden(model, hidden[:, :-1])  # [R, P-1, V]
        # classes on the contiguous last dim: over logits.transpose(1, 2) cross-entropy is ~3x slower
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = loss.view(ids.shape[0], -1)  # [R, P-1]
        m = mask[:, 1:].to(loss.dtype)
        return (loss * m).sum(1) / m.sum(1)


class MLMLossTask(_TextTask):
    """Masked-token cross-entropy per text (encoders with an MLM head). A fraction
    ``mask_prob`` of each text's non-special tokens (at least one) is replaced by the mask token,
    deterministically under ``seed`` and the example's index. Lower is better."""
    kind, metric_name, higher_is_better = "mlm", "mlm_loss", False

    def __init__(self, texts, name=None, max_tokens=64, mask_prob: float = 0.15, seed: int = 0):
        check(0 < mask_prob < 1, f"mask_prob must lie in (0, 1), got {mask_prob}")
        self.mask_prob, self.seed = mask_prob, seed
        super().__init__(texts, name, max_tokens)

    def prepare(self, model, inputs):
        tok = model.tokenizer
        check(tok is not None and tok.mask_token_id is not None, "MLMLossTask needs a tokenizer with a mask token")
        ids = inputs["input_ids"].clone()
        labels = torch.full_like(ids, -100)
        special = torch.tensor(sorted(set(tok.all_special_ids)), device=ids.device)
        for r in range(ids.shape[0]):
            cand = ((inputs["attention_mask"][r] == 1) & ~torch.isin(ids[r], special)).nonzero()[:, 0]
            check(len(cand) > 0, f"task {self.name!r}: text {self.ids[r]} has no token to mask")
            u = torch.rand(len(cand), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.ids[r]))
            pick = cand[(u < self.mask_prob) | (u == u.min())]
            labels[r, pick] = ids[r, pick]
            ids[r, pick] = tok.mask_token_id
        return dict(inputs, input_ids=ids), {"labels": labels}, None

    def score(self, model, hidden, batch, reference=None):
        labels = batch.targets["labels"]
        where = labels != -100
        logits = logits_from_hidden(model, hidden[where])  # [M, V]
        loss = F.cross_entropy(logits, labels[where], reduction="none")
        row = where.nonzero()[:, 0]
        total = torch.zeros(labels.shape[0], dtype=loss.dtype, device=loss.device).index_add(0, row, loss)
        return total / where.sum(1).to(loss.dtype)


class FidelityTask(_TextTask):
    """Faithfulness to the unablated model on the same texts. ``measure="kl"``: KL(clean || model)
    of next-token distributions, mean over real positions (lower is better); ``"cosine"``: cosine
    of the mean-pooled sentence embeddings (higher is better; for encoders without a head)."""
    kind, needs_reference = "fidelity", True

    def __init__(self, texts, name=None, max_tokens=64, measure: str = "kl"):
        check(measure in ("kl", "cosine"), f"measure must be 'kl' or 'cosine', got {measure!r}")
        self.measure = measure
        self.metric_name = "kl_divergence" if measure == "kl" else "embedding_cosine"
        self.higher_is_better = measure == "cosine"
        super().__init__(texts, name, max_tokens)

    def score(self, model, hidden, batch, reference=None):
        check(reference is not None, "FidelityTask needs the unablated model's hidden states")
        mask = batch.inputs["attention_mask"]
        if self.measure == "cosine":
            return F.cosine_similarity(mean_pool(hidden, mask), mean_pool(reference, mask), dim=-1)
        logp = torch.log_softmax(logits_from_hidden(model, hidden), -1)
        ref = torch.log_softmax(logits_from_hidden(model, reference), -1)
        kl = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1)  # [R, P]
        m = mask.to(kl.dtype)
        return (kl * m).sum(1) / m.sum(1)


class CallableTask(_TextTask):
    """A user metric: ``fn(output, inputs) -> [B]`` where ``output`` is the logits ``[B, P, V]``
    (``output="logits"``) or final hidden states ``[B, P, D]`` and ``inputs`` the batch dict."""
    kind = "callable"

    def __init__(self, texts, fn: Callable, higher_is_better: bool = True, metric_name: str = "custom",
                 output: str = "logits", name=None, max_tokens=64):
        check(callable(fn), "fn must be callable: fn(output, inputs) -> one value per example")
        check(output in ("logits", "hidden"), f"output must be 'logits' or 'hidden', got {output!r}")
        self.fn, self.output = fn, output
        self.higher_is_better, self.metric_name = higher_is_better, metric_name
        super().__init__(texts, name, max_tokens)

    def score(self, model, hidden, batch, reference=None):
        out = logits_from_hidden(model, hidden) if self.output == "logits" else hidden
        values = self.fn(out, batch.inputs)
        try:
            return torch.as_tensor(values, device=hidden.device)
        except (TypeError, ValueError, RuntimeError):
            raise HeadlensError(f"task {self.name!r}: fn must return one number per example (a [B] tensor "
                                f"or list), got {type(values).__name__}") from None


class ContrastTask(Task):
    """Contrast pairs / multiple choice at one answer position (IOI-style): metric = logit of the
    ``right`` continuation minus the largest logit among the ``wrong`` ones (``metric="logit_diff"``,
    higher is better) or 1 where right wins (``"accuracy"``). The answer position is the prompt's
    mask token when it has one (MLM encoders), else its last token. Continuations are strings
    (their first token counts) or token ids. ``corrupted``: counterfactual prompts of the same
    token length, used by attribution patching."""
    kind = "contrast"
    _fields = ("prompts", "right", "wrong", "corrupted")

    def __init__(self, prompts, right, wrong, corrupted=None, metric: str = "logit_diff", name=None):
        check(metric in ("logit_diff", "accuracy"), f"metric must be 'logit_diff' or 'accuracy', got {metric!r}")
        self.prompts, self.right = list(prompts), list(right)
        self.wrong = [w if isinstance(w, (list, tuple)) else [w] for w in wrong]
        self.corrupted = list(corrupted) if corrupted is not None else None
        self.metric_name = metric
        super().__init__(name, None)

    def rows(self, i):
        return [self.prompts[i]]

    def _token(self, model, answer) -> int:
        if isinstance(answer, (int, np.integer)):
            tid = int(answer)
        else:
            check(model.tokenizer is not None, "continuations given as text need a model with a tokenizer")
            ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
            check(len(ids) > 0, f"continuation {answer!r} has no tokens")
            tid = ids[0]
        check(0 <= tid < model.cfg.vocab_size, f"continuation token {tid} is outside the vocabulary")
        return tid

    def prepare(self, model, inputs):
        mask = inputs["attention_mask"]
        pos = mask.sum(1) - 1
        mask_id = getattr(model.tokenizer, "mask_token_id", None)
        if mask_id is not None:
            is_mask = inputs["input_ids"] == mask_id
            pos = torch.where(is_mask.any(1), is_mask.int().argmax(1), pos)
        W = max(len(w) for w in self.wrong)
        wrong = [[self._token(model, x) for x in w] for w in self.wrong]
        targets = {"pos": pos, "right": torch.tensor([self._token(model, x) for x in self.right]),
                   "wrong": torch.tensor([w + [w[0]] * (W - len(w)) for w in wrong])}
        targets = {k: v.to(mask.device) for k, v in targets.items()}
        corrupted = None
        if self.corrupted is not None:
            corrupted = self.encode_rows(model, self.corrupted, pad_to=mask.shape[1])
            P = corrupted["input_ids"].shape[1]
            n_clean, n_corr = mask.sum(1), corrupted["attention_mask"].sum(1)
            bad = (n_clean != n_corr).nonzero()
            check(P == mask.shape[1] and len(bad) == 0,
                  f"task {self.name!r}: corrupted prompt {self.ids[int(bad[0]) if len(bad) else 0]} has a "
                  "different number of tokens than its clean prompt")
        return inputs, targets, corrupted

    def score(self, model, hidden, batch, reference=None):
        t = batch.targets
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), t["pos"]]  # [B, D]
        logits = logits_from_hidden(model, h)
        diff = logits.gather(1, t["right"][:, None])[:, 0] - logits.gather(1, t["wrong"]).max(1).values
        return diff if self.metric_name == "logit_diff" else (diff > 0).float()


class EmbeddingContrastTask(Task):
    """(anchor, positive, negative) sentence triples for embedding models (MiniLM): metric =
    cos(anchor, positive) - cos(anchor, negative) of mean-pooled final hidden states
    (``metric="cosine_margin"``, higher is better) or 1 where the positive is closer (``"accuracy"``)."""
    kind, rows_per_example = "embedding_contrast", 3
    _fields = ("anchors", "positives", "negatives")

    def __init__(self, anchors, positives, negatives, metric: str = "cosine_margin", name=None, max_tokens=None):
        check(metric in ("cosine_margin", "accuracy"), f"metric must be 'cosine_margin' or 'accuracy', got {metric!r}")
        self.anchors, self.positives, self.negatives = list(anchors), list(positives), list(negatives)
        self.metric_name = metric
        super().__init__(name, max_tokens)

    def rows(self, i):
        return [self.anchors[i], self.positives[i], self.negatives[i]]

    def score(self, model, hidden, batch, reference=None):
        emb = mean_pool(hidden, batch.inputs["attention_mask"]).view(-1, 3, hidden.shape[-1])
        margin = (F.cosine_similarity(emb[:, 0], emb[:, 1], dim=-1)
                  - F.cosine_similarity(emb[:, 0], emb[:, 2], dim=-1))
        return margin if self.metric_name == "cosine_margin" else (margin > 0).to(margin.dtype)


# --- loading ----------------------------------------------------------------------------------
BUNDLED = {
    "paraphrase": ("paraphrase.jsonl", None, "sentence triples (paraphrase vs. distractor) for embedding models"),
    "ioi": ("ioi.jsonl", None, "IOI-style indirect-object prompts with ABC counterfactuals, for decoders"),
    "text": ("pydoc_text.txt", None, "Python-docs prose: LM loss, MLM loss or embedding fidelity by model"),
    "lm": ("pydoc_text.txt", "lm", "Python-docs prose, next-token loss"),
    "mlm": ("pydoc_text.txt", "mlm", "Python-docs prose, masked-token loss"),
    "fidelity": ("pydoc_text.txt", "fidelity", "Python-docs prose, faithfulness to the unablated model"),
}
TEXT_KINDS = {"lm": LMLossTask, "mlm": MLMLossTask, "fidelity": FidelityTask}


def list_tasks() -> pd.DataFrame:
    """The bundled tasks: name, file, description."""
    return pd.DataFrame([(n, f, d) for n, (f, _, d) in BUNDLED.items()], columns=["name", "file", "description"])


def default_task_name(model) -> str:
    """``ioi`` for decoders, ``text`` (MLM loss) for MLM encoders, ``paraphrase`` otherwise."""
    if model.cfg.causal:
        return "ioi"
    return "text" if model.unembed is not None else "paraphrase"


def _text_kind(model) -> str:
    if model is None or (model.cfg.causal and model.unembed is not None):
        return "lm"
    return "mlm" if model.unembed is not None else "fidelity"


def load_task(name_or_path: Union[str, Path, Task], model=None, kind: Optional[str] = None,
              n_examples: Optional[int] = None, **options) -> Task:
    """A task from a bundled name (see :func:`list_tasks`), a text file (one example per line)
    or a JSONL file (records with ``prompt/right/wrong[/corrupted]``, ``anchor/positive/negative``
    or ``text``). ``kind`` picks the text task (``lm``, ``mlm``, ``fidelity``; default: by
    ``model``); ``n_examples`` keeps the first n; ``options`` go to the task's constructor."""
    if isinstance(name_or_path, Task):
        task = name_or_path
    else:
        name = str(name_or_path)
        if name in BUNDLED:
            path, kind = DATA / BUNDLED[name][0], kind or BUNDLED[name][1]
        else:
            path = Path(name)
            if not path.is_file():
                raise HeadlensError(f"task {name!r} is neither a bundled task ({', '.join(BUNDLED)}) nor a file")
        task = _read_task(path, model, kind, options)
        task.name = name if name in BUNDLED else path.stem
    if n_examples is not None:
        check(n_examples >= 1, f"n_examples must be >= 1, got {n_examples}")
        task = task.subset(range(min(n_examples, len(task))))
    return task


def _read_task(path: Path, model, kind, options) -> Task:
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        lines = [x for x in text.splitlines() if x.strip()]
        return _text_task(lines, model, kind, options)
    try:
        records = [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise HeadlensError(f"task file {str(path)!r} is not valid JSONL: {e}") from e
    check(len(records) > 0, f"task file {str(path)!r} is empty")
    keys = set(records[0])
    col = (lambda k: [r.get(k) for r in records])
    if {"prompt", "right", "wrong"} <= keys:
        corrupted = col("corrupted") if "corrupted" in keys else None
        return ContrastTask(col("prompt"), col("right"), col("wrong"), corrupted, **options)
    if {"anchor", "positive", "negative"} <= keys:
        return EmbeddingContrastTask(col("anchor"), col("positive"), col("negative"), **options)
    if "text" in keys:
        return _text_task(col("text"), model, kind, options)
    raise HeadlensError(f"task file {str(path)!r}: records need the fields prompt/right/wrong, "
                        f"anchor/positive/negative or text; got {sorted(keys)}")


def _text_task(lines, model, kind, options) -> Task:
    kind = kind or _text_kind(model)
    check(kind in TEXT_KINDS, f"kind must be one of {sorted(TEXT_KINDS)}, got {kind!r}")
    if kind == "fidelity" and model is not None and "measure" not in options:
        options = dict(options, measure="kl" if model.unembed is not None else "cosine")
    return TEXT_KINDS[kind](lines, **options)

"""The types of task (see :mod:`headlens.importance.tasks.base` for the protocol and the shapes).

:class:`LMLossTask` (next-token loss), :class:`MLMLossTask` (masked-token loss),
:class:`ContrastTask` (logit difference right - wrong at the answer position, IOI-style, or
accuracy), :class:`EmbeddingContrastTask` (cos(anchor, positive) - cos(anchor, negative) of
mean-pooled sentence embeddings), :class:`FidelityTask` (KL to the unablated model's output, or
cosine of its sentence embeddings), :class:`RepeatedHalfTask` (next-token loss on the repeated
copy of ``[BOS, x, x]``, which only induction predicts) and :class:`CallableTask` (a user function).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from headlens.errors import HeadlensError, check
from headlens.importance.tasks.base import Task, as_sequence, logits_from_hidden, mean_pool, next_token_loss


class _TextTask(Task):
    """Tasks over plain text lines (``texts``); long texts are cut to ``max_tokens``."""
    _fields = ("texts",)

    def __init__(self, texts: Sequence, name=None, max_tokens: Optional[int] = 64):
        self.texts = as_sequence(texts)  # a file's column stays on disk
        super().__init__(name, max_tokens)

    def rows(self, i):
        return [self.texts[i]]


class LMLossTask(_TextTask):
    """Mean next-token cross-entropy per text (decoders), padding excluded. Lower is better."""
    task_type, metric_name, higher_is_better = "lm", "lm_loss", False

    def prepare(self, model, inputs, examples):
        short = (inputs["attention_mask"].sum(1) < 2).nonzero()[:, 0].tolist()
        check(not short, f"task {self.name!r}: text {self.ids[examples[short[0]]] if short else ''} has fewer "
                         "than 2 tokens: no next token to predict")
        return inputs, {}, None

    def score(self, model, hidden, batch, reference=None):
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        loss = next_token_loss(model, hidden, ids)  # [R, P-1]
        m = mask[:, 1:].to(loss.dtype)
        return (loss * m).sum(1) / m.sum(1)


class MLMLossTask(_TextTask):
    """Masked-token cross-entropy per text (encoders with an MLM head). A fraction
    ``mask_prob`` of each text's non-special tokens (at least one) is replaced by the mask token,
    deterministically under ``seed`` and the example's index. Lower is better."""
    task_type, metric_name, higher_is_better = "mlm", "mlm_loss", False

    def __init__(self, texts, name=None, max_tokens=64, mask_prob: float = 0.15, seed: int = 0):
        check(0 < mask_prob < 1, f"mask_prob must lie in (0, 1), got {mask_prob}")
        self.mask_prob, self.seed = mask_prob, seed
        super().__init__(texts, name, max_tokens)

    def prepare(self, model, inputs, examples):
        tok = model.tokenizer
        check(tok is not None and tok.mask_token_id is not None, "MLMLossTask needs a tokenizer with a mask token")
        ids = inputs["input_ids"].clone()
        labels = torch.full_like(ids, -100)
        special = torch.tensor(sorted(set(tok.all_special_ids)), device=ids.device)
        for r in range(ids.shape[0]):
            cand = ((inputs["attention_mask"][r] == 1) & ~torch.isin(ids[r], special)).nonzero()[:, 0]
            example = self.ids[examples[r]]
            check(len(cand) > 0, f"task {self.name!r}: text {example} has no token to mask")
            u = torch.rand(len(cand), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + example))
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
    task_type, needs_reference = "fidelity", True

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
    task_type = "callable"

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
    task_type = "contrast"
    _fields = ("prompts", "right", "wrong", "corrupted")

    def __init__(self, prompts, right, wrong, corrupted=None, metric: str = "logit_diff", name=None):
        check(metric in ("logit_diff", "accuracy"), f"metric must be 'logit_diff' or 'accuracy', got {metric!r}")
        self.prompts, self.right = as_sequence(prompts), as_sequence(right)
        self.wrong = [w if isinstance(w, (list, tuple)) else [w] for w in wrong]
        self.corrupted = as_sequence(corrupted) if corrupted is not None else None
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

    def prepare(self, model, inputs, examples):
        mask = inputs["attention_mask"]
        pos = mask.sum(1) - 1
        mask_id = getattr(model.tokenizer, "mask_token_id", None)
        if mask_id is not None:
            is_mask = inputs["input_ids"] == mask_id
            pos = torch.where(is_mask.any(1), is_mask.int().argmax(1), pos)
        W = max(len(self.wrong[i]) for i in examples)
        wrong = [[self._token(model, x) for x in self.wrong[i]] for i in examples]
        targets = {"pos": pos, "right": torch.tensor([self._token(model, self.right[i]) for i in examples]),
                   "wrong": torch.tensor([w + [w[0]] * (W - len(w)) for w in wrong])}
        targets = {k: v.to(mask.device) for k, v in targets.items()}
        corrupted = None
        if self.corrupted is not None:
            corrupted = self.encode_rows(model, [self.corrupted[i] for i in examples], pad_to=mask.shape[1])
            P = corrupted["input_ids"].shape[1]
            n_clean, n_corr = mask.sum(1), corrupted["attention_mask"].sum(1)
            bad = (n_clean != n_corr).nonzero()
            check(P == mask.shape[1] and len(bad) == 0,
                  f"task {self.name!r}: corrupted prompt {self.ids[examples[int(bad[0]) if len(bad) else 0]]} has a "
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
    task_type, rows_per_example = "embedding_contrast", 3
    _fields = ("anchors", "positives", "negatives")

    def __init__(self, anchors, positives, negatives, metric: str = "cosine_margin", name=None, max_tokens=None):
        check(metric in ("cosine_margin", "accuracy"), f"metric must be 'cosine_margin' or 'accuracy', got {metric!r}")
        self.anchors, self.positives, self.negatives = (as_sequence(x) for x in (anchors, positives, negatives))
        self.metric_name = metric
        super().__init__(name, max_tokens)

    def rows(self, i):
        return [self.anchors[i], self.positives[i], self.negatives[i]]

    def score(self, model, hidden, batch, reference=None):
        emb = mean_pool(hidden, batch.inputs["attention_mask"]).view(-1, 3, hidden.shape[-1])
        margin = (F.cosine_similarity(emb[:, 0], emb[:, 1], dim=-1)
                  - F.cosine_similarity(emb[:, 0], emb[:, 2], dim=-1))
        return margin if self.metric_name == "cosine_margin" else (margin > 0).to(margin.dtype)


class RepeatedHalfTask(Task):
    """Next-token loss on the repeated copy of ``[BOS?, x, x]`` (Olsson et al. 2022: only induction
    predicts it): per sequence, the mean loss predicting ``x[1:]`` in the second copy (``x[0]``
    follows an unseen token). ``tokens [N, P]``: token ids whose last ``2 * half_len`` positions
    are the two copies (e.g. :func:`headlens.synthetic.toys.eval_tokens`, :func:`headlens.patterns.scores.probe_tokens`).
    ``corrupted [N, P]``: counterfactual token ids of the same shape (e.g. a fresh first copy, so
    that nothing repeats), for patching; the loss is still that of predicting ``tokens``.
    Decoders only. Lower is better."""
    task_type, metric_name, higher_is_better = "repeated_half", "repeated_half_loss", False
    _fields = ("tokens", "corrupted")

    def __init__(self, tokens, half_len: int, name: Optional[str] = "repeated-half", corrupted=None):
        ids = self._ids(tokens, "tokens")
        check(isinstance(half_len, (int, np.integer)) and 2 <= half_len <= ids.shape[1] // 2,
              f"half_len must be an integer in [2, P // 2 = {ids.shape[1] // 2}], got {half_len!r}")
        self.tokens, self.half_len = ids.tolist(), int(half_len)
        self.corrupted = None
        if corrupted is not None:
            bad = self._ids(corrupted, "corrupted")
            check(bad.shape == ids.shape, f"corrupted must have the shape of tokens {tuple(ids.shape)}, "
                                          f"got {tuple(bad.shape)}")
            self.corrupted = bad.tolist()
        super().__init__(name, None)

    @staticmethod
    def _ids(tokens, name: str) -> torch.Tensor:
        try:
            ids = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise HeadlensError(f"{name} must be token ids [N, P] (rows of one length)") from None
        check(ids.ndim == 2 and not ids.is_floating_point(), f"{name} must be integer token ids [N, P], "
                                                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        return ids

    def rows(self, i):
        return [self.tokens[i]]

    def prepare(self, model, inputs, examples):
        check(model.cfg.causal, f"task {self.name!r} needs a decoder: {model.cfg.name!r} sees the whole sequence")
        corrupted = None if self.corrupted is None else self.encode_rows(model, [self.corrupted[i] for i in examples])
        return inputs, {}, corrupted

    def score(self, model, hidden, batch, reference=None):
        start = hidden.shape[1] - self.half_len  # x[0] of the second copy
        return next_token_loss(model, hidden[:, start:], batch.inputs["input_ids"][:, start:]).mean(1)

"""Long-context tasks: a long context, then a query decoded from the context's KV cache.

Each example is token ids ``[context | question | answer]``: the context is a haystack of real
prose with needles in it (``passkey``, ``needle``: one key; ``multikey``: several keys, one
asked for) or the beginning of a document (``lm``, whose "answer" is the document's
continuation). ``context_len`` is where the context ends: a KV cache compressed after prefilling
the context (kvpress, DuoAttention's streaming heads) changes only what comes after it.

Metric per example (:class:`LongContextTask`): ``loss``, the mean next-token cross-entropy of the
answer tokens (lower is better), or ``accuracy``, 1 when every answer token is the model's top
prediction, i.e. greedy decoding reproduces the answer exactly.

The examples are built from the bundled task records (``headlens/data/longcontext``, made by its
``make_longcontext.py``) with the model's tokenizer, to an exact number of tokens
(:func:`load_long_context`).

Shapes: ``N`` examples, ``R`` rows of a batch, ``P`` positions, ``D`` d_model, ``M`` scored tokens.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from headlens.data import DATA_DIR
from headlens.errors import check
from headlens.importance.tasks import Task, logits_from_hidden

LONG_DIR = DATA_DIR / "longcontext"
RECORDS = LONG_DIR / "tasks.jsonl"
HAYSTACK = LONG_DIR / "haystack.txt"
KINDS = ("passkey", "needle", "multikey", "lm")
RETRIEVAL_KINDS = ("passkey", "needle", "multikey")
LENGTHS = (512, 1024, 2048, 4096, 8192)
SPLITS = ("select", "heldout")
METRICS = ("loss", "accuracy")


class LongContextTask(Task):
    """Token-id examples ``[context | question | answer]``.

    ``tokens``: per example the ids; ``context_len``: where the context ends; ``answer_start``:
    where the answer begins (the answer runs to the end); ``needle_span``: ``[start, end)`` of the
    needle that holds the answer (retrieval kinds; None for ``lm``); ``kinds``: the example's
    kind. ``metric``: ``"loss"`` or ``"accuracy"`` (see the module doc)."""

    kind = "long_context"
    _fields = ("tokens", "context_len", "answer_start", "needle_span", "kinds", "record_ids")

    def __init__(self, tokens: Sequence[Sequence[int]], context_len: Sequence[int], answer_start: Sequence[int],
                 needle_span: Optional[Sequence] = None, kinds: Optional[Sequence[str]] = None,
                 metric: str = "loss", name: Optional[str] = "long-context", record_ids=None):
        check(metric in METRICS, f"metric must be one of {METRICS}, got {metric!r}")
        self.tokens = [list(map(int, t)) for t in tokens]
        self.context_len, self.answer_start = [int(c) for c in context_len], [int(a) for a in answer_start]
        n = len(self.tokens)
        self.needle_span = list(needle_span) if needle_span is not None else [None] * n
        self.kinds = list(kinds) if kinds is not None else ["custom"] * n
        self.record_ids = list(record_ids) if record_ids is not None else [str(i) for i in range(n)]
        self.metric_name = "answer_loss" if metric == "loss" else "answer_accuracy"
        self.higher_is_better = metric == "accuracy"
        super().__init__(name, None)
        for i, (t, c, a) in enumerate(zip(self.tokens, self.context_len, self.answer_start)):
            check(0 < c <= a < len(t), f"task {self.name!r}, example {i}: need 0 < context_len ({c}) <= "
                                      f"answer_start ({a}) < its length ({len(t)})")

    def rows(self, i):
        return [self.tokens[i]]

    def with_metric(self, metric: str) -> "LongContextTask":
        """The same examples scored by ``metric``."""
        return LongContextTask(self.tokens, self.context_len, self.answer_start, self.needle_span, self.kinds,
                               metric, self.name, self.record_ids)

    def prepare(self, model, inputs, examples):
        check(model.cfg.causal, f"task {self.name!r} needs a decoder: {model.cfg.name!r} sees the whole sequence")
        device = inputs["input_ids"].device
        targets = {"context_len": torch.tensor([self.context_len[i] for i in examples], device=device),
                   "answer_start": torch.tensor([self.answer_start[i] for i in examples], device=device),
                   "answer_end": torch.tensor([len(self.tokens[i]) for i in examples], device=device)}
        return inputs, targets, None

    def scored(self, batch) -> torch.Tensor:
        """``[R, P]`` bool: the positions whose next token is an answer token."""
        P = batch.inputs["input_ids"].shape[1]
        pos = torch.arange(P, device=batch.inputs["input_ids"].device)[None]
        t = batch.targets
        return (pos >= t["answer_start"][:, None] - 1) & (pos < t["answer_end"][:, None] - 1)

    def score(self, model, hidden, batch, reference=None):
        where = self.scored(batch)
        ids = batch.inputs["input_ids"]
        nxt = torch.roll(ids, -1, dims=1)[where]  # [M]: the answer tokens
        logits = logits_from_hidden(model, hidden[where])  # [M, V]
        row = where.nonzero()[:, 0]
        R = ids.shape[0]
        if self.metric_name == "answer_loss":
            loss = F.cross_entropy(logits, nxt, reduction="none")
            total = torch.zeros(R, dtype=loss.dtype, device=loss.device).index_add(0, row, loss)
            return total / where.sum(1).to(loss.dtype)
        wrong = (logits.argmax(-1) != nxt).to(torch.float32)
        misses = torch.zeros(R, device=wrong.device).index_add(0, row, wrong)
        return (misses == 0).to(torch.float32)


# --- the bundled examples ---------------------------------------------------------------------
@lru_cache(maxsize=1)
def _records() -> tuple:
    check(RECORDS.is_file(), f"the long-context task file {RECORDS} is missing: run "
                             "python headlens/data/longcontext/make_longcontext.py")
    return tuple(json.loads(line) for line in RECORDS.read_text(encoding="utf-8").splitlines() if line.strip())


@lru_cache(maxsize=1)
def _haystack() -> str:
    check(HAYSTACK.is_file(), f"the haystack file {HAYSTACK} is missing")
    return HAYSTACK.read_text(encoding="utf-8")


def list_records(kinds=KINDS, lengths=LENGTHS, split: Optional[str] = None) -> list[dict]:
    """The bundled task records of ``kinds``, ``lengths`` and ``split`` (None: both)."""
    kinds, lengths = _as_tuple(kinds), tuple(int(x) for x in _as_tuple(lengths))
    check(all(k in KINDS for k in kinds), f"kinds must be among {KINDS}, got {list(kinds)}")
    check(all(n in LENGTHS for n in lengths), f"lengths must be among {LENGTHS}, got {list(lengths)}")
    check(split is None or split in SPLITS, f"split must be one of {SPLITS} or None, got {split!r}")
    return [r for r in _records() if r["kind"] in kinds and r["length"] in lengths
            and (split is None or r["split"] == split)]


def _as_tuple(x) -> tuple:
    return (x,) if isinstance(x, (str, int)) else tuple(x)


def load_long_context(model, kinds=RETRIEVAL_KINDS, lengths=(1024,), split: str = "select",
                      n_per_group: Optional[int] = None, metric: str = "loss") -> LongContextTask:
    """The bundled examples of ``kinds`` x ``lengths`` in ``split`` (``select``: to choose heads
    and plans on; ``heldout``: to score them), built for ``model``'s tokenizer to exactly
    ``length`` tokens each; ``n_per_group``: the first n of each (kind, length)."""
    tok = model.tokenizer
    check(tok is not None, "long-context tasks are built from text: the model needs a tokenizer")
    for n in _as_tuple(lengths):
        check(int(n) <= model.cfg.n_ctx, f"length {n} exceeds the model's context of {model.cfg.n_ctx} tokens")
    records = list_records(kinds, lengths, split)
    if n_per_group is not None:
        check(n_per_group >= 1, f"n_per_group must be >= 1, got {n_per_group}")
        seen: dict = {}
        records = [r for r in records if seen.setdefault((r["kind"], r["length"]), []).append(r) is None
                   and len(seen[(r["kind"], r["length"])]) <= n_per_group]
    check(len(records) > 0, "no long-context examples selected")
    built = [build_example(r, tok, model.cfg.bos_token_id) for r in records]
    name = f"long-context-{split}"
    return LongContextTask([b["tokens"] for b in built], [b["context_len"] for b in built],
                           [b["answer_start"] for b in built], [b["needle_span"] for b in built],
                           [r["kind"] for r in records], metric, name, [r["id"] for r in records])


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def build_example(record: dict, tok, bos: Optional[int] = None) -> dict:
    """Token ids of one record, exactly ``record["length"]`` long: ``tokens``, ``context_len``,
    ``answer_start``, ``needle_span`` (``[start, end)`` of the needle asked for, or None).

    The haystack is cut from the record's part of the bundled prose at ``offset``; needles go in
    at their ``depth`` (a fraction of the haystack), moved to the nearest sentence end. Leading
    answer tokens that are only whitespace move to the question (the model is not asked to
    predict a bare space)."""
    length = int(record["length"])
    head = [bos] if bos is not None else []
    hay = _haystack()
    text = hay[record["offset"]:record["offset"] + 8 * length]
    if record["kind"] == "lm":
        ids = _ids(tok, text)
        check(len(ids) >= length - len(head), f"record {record['id']}: the haystack is too short for {length} tokens")
        ids = head + ids[:length - len(head)]
        start = length - int(record["n_answer"])
        return dict(tokens=ids, context_len=start, answer_start=start, needle_span=None)
    question, answer = _ids(tok, record["question"]), _ids(tok, record["answer"])
    while len(answer) > 1 and tok.decode(answer[:1]).strip() == "":
        question, answer = question + answer[:1], answer[1:]
    needles = [_ids(tok, n["text"]) for n in record["needles"]]
    budget = length - len(head) - len(question) - len(answer) - sum(map(len, needles))
    ids = _ids(tok, text)
    check(budget > 0 and len(ids) >= budget, f"record {record['id']}: the haystack is too short for {length} tokens")
    ids = ids[:budget]
    ends = _sentence_ends(tok, ids)
    order = sorted(range(len(needles)), key=lambda k: record["needles"][k]["depth"])
    context, at, span = list(head), 0, None
    for k in order:
        cut = _nearest(ends, round(record["needles"][k]["depth"] * budget), lo=at)
        context += ids[at:cut]
        if k == record["asked"]:
            span = [len(context), len(context) + len(needles[k])]
        context += needles[k]
        at = cut
    context += ids[at:]
    tokens = context + question + answer
    assert len(tokens) == length
    return dict(tokens=tokens, context_len=len(context), answer_start=len(context) + len(question),
                needle_span=span)


def _sentence_ends(tok, ids: list[int]) -> np.ndarray:
    """Positions just after a token that ends a sentence ('.', '!' or '?')."""
    pieces = tok.convert_ids_to_tokens(ids)
    return np.array([i + 1 for i, p in enumerate(pieces) if p and p.rstrip()[-1:] in (".", "!", "?")], dtype=int)


def _nearest(ends: np.ndarray, target: int, lo: int) -> int:
    ok = ends[ends >= lo]
    if not len(ok):
        return max(lo, target)
    return int(ok[np.argmin(np.abs(ok - target))])

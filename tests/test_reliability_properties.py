"""Property-based tests (hypothesis): the public functions, fed random shapes, masks, gates,
token ids, head lists and plans, either work (finite outputs of the right shape) or raise
:class:`HeadlensError` -- nothing else. A torch ``RuntimeError``, an ``IndexError`` or NaN in a
result fails the test, and hypothesis prints the smallest input that shows it.

Where the inputs are built as "valid, plus one named defect" the property is sharper: each test
is parametrised by the defect (``None``: none), valid input must work and every defect must raise
HeadlensError, so every kind of bad input is generated on every run.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from headlens.errors import HeadlensError
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.model.heads import gate_without
from headlens.model.tokens import encode
from headlens.patterns.capture import capture_patterns
from headlens.patterns.scores import SCORE_COLUMNS, pattern_scores
from headlens.pruning.physical import prune_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

L, H, D, CTX, V = 3, 4, 32, 64, 30522  # the tiny GPT-2 of conftest.py
SETTINGS = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "it rains", "one two three four"]


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    return tiny_gpt2


def outcome(fn):
    """``(True, result)`` if ``fn()`` worked, ``(False, message)`` if it raised HeadlensError (with a
    short one-line message); any other exception propagates and fails the test."""
    try:
        return True, fn()
    except HeadlensError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 400, message
        return False, message


def finite(t) -> bool:
    return bool(torch.isfinite(torch.as_tensor(t)).all())


def seeded(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 10**6)))


# --- the model's forward pass --------------------------------------------------------------------
FORWARD_DEFECTS = [None, "no rows", "no positions", "too long", "token id", "negative id", "float ids",
                                "mask shape", "gate rows", "gate heads", "gate NaN", "gate inf", "stop layer",
                                "return type"]


@st.composite
def forward_inputs(draw, defect):
    """Valid forward arguments (random batch, length, ids, padding mask, gate, return type, stop
    layer), then ``defect``."""
    gen = seeded(draw)
    B, P = draw(st.integers(1, 3)), draw(st.integers(1, CTX))
    ids = torch.randint(0, V, (B, P), generator=gen)
    kwargs = {"return_type": draw(st.sampled_from(["logits", "hidden", None]))}
    if draw(st.booleans()):
        kwargs["attention_mask"] = (torch.rand(B, P, generator=gen) < 0.7).long()  # rows may be all padding
    if draw(st.booleans()):
        kwargs["head_gate"] = torch.rand(L, H, generator=gen) * 4 - 2
    if draw(st.booleans()):
        kwargs["stop_at_layer"] = draw(st.integers(0, L))
    if defect == "no rows":
        ids = ids[:0]
    elif defect == "no positions":
        ids = ids[:, :0]
    elif defect == "too long":
        ids = torch.randint(0, V, (B, CTX + draw(st.integers(1, 3))), generator=gen)
    elif defect == "token id":
        ids[0, -1] = V + draw(st.integers(0, 5))
    elif defect == "negative id":
        ids[-1, 0] = -1
    elif defect == "float ids":
        ids = ids.float()
    elif defect == "mask shape":
        kwargs["attention_mask"] = torch.ones(B, P + 1, dtype=torch.long)
    elif defect == "gate rows":
        kwargs["head_gate"] = torch.ones(L + draw(st.sampled_from([-1, 1])), H)
    elif defect == "gate heads":
        kwargs["head_gate"] = torch.ones(L, H - 1)
    elif defect in ("gate NaN", "gate inf"):
        gate = torch.ones(L, H)
        gate[draw(st.integers(0, L - 1)), draw(st.integers(0, H - 1))] = math.nan if defect == "gate NaN" else -math.inf
        kwargs["head_gate"] = gate
    elif defect == "stop layer":
        kwargs["stop_at_layer"] = draw(st.sampled_from([-1, L + 1]))
    elif defect == "return type":
        kwargs["return_type"] = "probabilities"
    return ids, kwargs


@pytest.mark.parametrize("defect", FORWARD_DEFECTS)
def test_forward(model, defect):
    @settings(max_examples=40 if defect is None else 6, **SETTINGS)
    @given(inputs=forward_inputs(defect))
    def check(inputs):
        ids, kwargs = inputs
        ok, out = outcome(lambda: model(ids, **kwargs))
        assert ok == (defect is None), f"defect {defect!r}: {out}"
        if not ok:
            return
        B, P = ids.shape
        if kwargs["return_type"] is None and "stop_at_layer" not in kwargs:
            assert out is None
            return
        width = V if kwargs["return_type"] == "logits" and "stop_at_layer" not in kwargs else D
        assert out.shape == (B, P, width) and finite(out)

    check()


# --- tokenizing ------------------------------------------------------------------------------------
def test_encode(model):
    seen = set()

    @settings(max_examples=50, **SETTINGS)
    @given(data=st.one_of(
        st.lists(st.lists(st.integers(-2, V + 2), max_size=CTX + 4), max_size=4),
        st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=CTX), min_size=1, max_size=4),
        st.lists(st.text(max_size=60), max_size=4),
        st.lists(st.sampled_from(TEXTS + ["word " * 70, "", "  ", "ünïcødé → ∑ 🙂", "\x00\t"]), max_size=4),
        st.sampled_from([None, 3, 2.5, {"a": 1}]),
    ), truncate=st.booleans())
    @example(data=TEXTS, truncate=False)
    @example(data=["word " * 70], truncate=False)
    def check(data, truncate):
        ok, batch = outcome(lambda: encode(model, data, truncate=truncate))
        seen.add(ok)
        if not ok:
            return
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == len(data) and 0 < ids.shape[1] <= CTX
        assert int(ids.min()) >= 0 and int(ids.max()) < V and (mask.sum(1) > 0).all()
        assert finite(model(batch, return_type="hidden"))

    check()
    assert seen == {True, False}


# --- capturing patterns and scoring them ----------------------------------------------------------
CAPTURE_DEFECTS = [None, "empty dataset", "empty sequence", "too long", "batch size", "token id"]


@st.composite
def token_datasets(draw, defect):
    gen = seeded(draw)
    lengths = draw(st.lists(st.integers(1, CTX), min_size=1, max_size=5))
    data = [torch.randint(1000, 2000, (k,), generator=gen).tolist() for k in lengths]
    batch_size = draw(st.integers(1, 4))
    i = draw(st.integers(0, len(data) - 1))
    if defect == "empty dataset":
        data = []
    elif defect == "empty sequence":
        data[i] = []
    elif defect == "too long":
        data[i] = [1000] * (CTX + 1)
    elif defect == "batch size":
        batch_size = draw(st.sampled_from([0, -1]))
    elif defect == "token id":
        data[i][-1] = V
    return data, batch_size


@pytest.mark.parametrize("defect", CAPTURE_DEFECTS)
def test_capture(model, defect):
    @settings(max_examples=25 if defect is None else 4, **SETTINGS)
    @given(inputs=token_datasets(defect))
    def check(inputs):
        data, batch_size = inputs
        ok, captured = outcome(lambda: capture_patterns(model, data, batch_size=batch_size))
        assert ok == (defect is None), f"defect {defect!r}: {captured}"
        if not ok:
            return
        assert [pb.input_ids.shape[0] for pb in captured] == [len(data[i:i + batch_size])
                                                              for i in range(0, len(data), batch_size)]
        for pb in captured:
            B, P = pb.input_ids.shape
            assert pb.patterns.shape == (B, L * H, P, P) and finite(pb.patterns)
            rows = pb.patterns.sum(-1)[pb.query_mask[:, None, :].expand(B, L * H, P)]
            assert torch.allclose(rows, torch.ones_like(rows), atol=1e-4)

    check()


@pytest.mark.parametrize("defect", [None, "empty dataset", "too long"])
def test_pattern_scores(model, defect):
    @settings(max_examples=6 if defect is None else 2, **SETTINGS)
    @given(inputs=token_datasets(defect))
    def check(inputs):
        data, _ = inputs
        ok, table = outcome(lambda: pattern_scores(model, data, batch_size=2, n_probe=2, probe_len=4))
        assert ok == (defect is None), f"defect {defect!r}: {table}"
        if not ok:
            return
        assert list(zip(table["layer"], table["head"])) == model.head_labels()
        # scores over pairs of positions are undefined (NaN) when every text has one token
        some_pairs = max(len(x) for x in data) >= 2
        columns = [c for c in SCORE_COLUMNS if some_pairs or c not in
                   ("score_previous_token", "score_next_token", "score_first_token", "score_entropy_norm")]
        assert np.isfinite(table[columns].to_numpy()).all()

    check()


# --- head indices: ablation and physical pruning ---------------------------------------------------
valid_head = st.tuples(st.integers(0, L - 1), st.integers(0, H - 1))
bad_head = st.one_of(st.tuples(st.sampled_from([-1, L, 7]), st.integers(0, H - 1)),
                     st.tuples(st.integers(0, L - 1), st.sampled_from([-1, H, 1.5, None, "x"])))


@st.composite
def head_lists(draw, defect):
    heads = draw(st.lists(valid_head, min_size=1, max_size=3))
    kind = draw(st.sampled_from(["zero", "mean", "resample", "uniform"]))
    if defect == "bad head":
        heads.insert(draw(st.integers(0, len(heads))), draw(bad_head))
    elif defect == "no heads":
        heads = []
    elif defect == "bad kind":
        kind = "shuffle"
    return heads, kind


@pytest.mark.parametrize("defect", [None, "bad head", "no heads", "bad kind"])
def test_ablation_sweep(model, defect):
    task = LMLossTask(TEXTS)

    @settings(max_examples=10 if defect is None else 4, **SETTINGS)
    @given(inputs=head_lists(defect), method=st.sampled_from(["fast", "naive"]))
    def check(inputs, method):
        heads, kind = inputs
        ok, table = outcome(lambda: ablation_sweep(model, task, kind, heads=heads, method=method,
                                                   n_bootstrap=10, batch_size=2, progress=False))
        assert ok == (defect is None), f"defect {defect!r}: {table}"
        if not ok:
            return
        assert list(zip(table["layer"], table["head"])) == sorted(set(heads))
        assert np.isfinite(table[["importance", "importance_se", "metric_ablated"]].to_numpy()).all()

    check()


@st.composite
def plans(draw, defect):
    removed = draw(st.lists(valid_head, max_size=L * H))
    plan = {}
    for layer, head in removed:
        plan.setdefault(draw(st.sampled_from([layer, str(layer)])), []).append(head)
    if defect == "bad head":
        layer, head = draw(st.tuples(st.integers(0, L - 1), st.sampled_from([-1, H, 9, 1.5, None, "x"])))
        plan[layer] = plan.get(layer, []) + [head]
    elif defect == "bad layer":
        plan[draw(st.sampled_from([-1, L, "x"]))] = [0]
    elif defect == "not a list":
        plan[0] = 2
    return plan, sorted(set(removed))


@pytest.mark.parametrize("defect", [None, "bad head", "bad layer", "not a list"])
def test_prune_heads(model, defect):
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102]])

    @settings(max_examples=25 if defect is None else 6, **SETTINGS)
    @given(inputs=plans(defect))
    def check(inputs):
        plan, removed = inputs
        ok, pruned = outcome(lambda: prune_heads(model, plan))
        assert ok == (defect is None), f"defect {defect!r}: {pruned}"
        if not ok:
            return
        assert pruned.cfg.n_heads_total == L * H - len(removed)
        assert set(pruned.head_labels()) == set(model.head_labels()) - set(removed)
        with torch.no_grad():
            expected = model(ids, head_gate=gate_without(model, removed))
            got = pruned(ids)
        assert finite(got) and torch.allclose(got, expected, atol=1e-4)

    check()

"""Task-sensitivity controls and the power estimate: a task that needs attention is told from one
that does not, and the sample sizes equal the textbook numbers of the paired t-test."""
import math

import numpy as np
import pytest
import torch

import headlens
from headlens.importance.controls import (
    chance_level,
    detectable_effect,
    examples_needed,
    power_estimate,
    task_controls,
)
from headlens.importance.tasks import LMLossTask, RepeatedHalfTask, load_task
from headlens.synthetic.planted import planted_model
from headlens.synthetic.toys import eval_tokens


def test_sample_sizes_are_the_paired_t_tests():
    # two-sided paired t-test, power 0.8: d = 0.5 needs 34 pairs, d = 0.8 needs 15, d = 0.2 needs 199
    assert [examples_needed(1.0, d) for d in (0.5, 0.8, 0.2)] == [34, 15, 199]
    assert examples_needed(2.0, 1.0) == 34  # only effect / sd matters
    assert examples_needed(1.0, 0.5, alpha=0.001) > 34
    d = detectable_effect(1.0, 34)
    assert 0.48 < d <= 0.5 and detectable_effect(1.0, 33) > d
    est = power_estimate(np.random.default_rng(0).normal(0, 2, 40), effect=1.0, n_tests=10)
    assert est["n_needed"] == examples_needed(est["sd"], 1.0) and est["n_needed_familywise"] > est["n_needed"]


def test_chance_levels(minilm):
    assert chance_level(load_task("paraphrase", minilm, n_examples=2), minilm) == 0.0
    assert chance_level(load_task("word-order", minilm, n_examples=2, metric="accuracy"), minilm) == 0.5
    model = planted_model({}, n_layers=1, n_heads=2, vocab_size=10, n_ctx=8)
    assert chance_level(LMLossTask([[1, 2, 3]]), model) == pytest.approx(math.log(10))


def test_a_task_without_attention_is_flagged():
    """Heads that already attend uniformly and write nothing: uniform attention changes nothing,
    the task keeps all of its (above-chance) metric: needs_attention is False."""
    model = planted_model({}, n_layers=1, n_heads=2, vocab_size=10, n_ctx=8)
    with torch.no_grad():
        model.unembed.W_U.mul_(3.0)  # a confident next-token guess (the current token): below chance loss
    gen = torch.Generator().manual_seed(0)
    texts = [[int(t)] * 6 for t in torch.randint(0, 10, (6,), generator=gen)]  # repeats: the guess is right
    c = task_controls(model, LMLossTask(texts))
    assert c["uniform"] == pytest.approx(c["full"]) and c["kept_uniform"] == pytest.approx(1.0)
    assert c["full"] < c["chance"] and c["needs_attention"] is False


def test_induction_needs_attention():
    """The trained 2-layer toy predicts the repeated half by induction: with uniform attention (or no
    attention) it keeps almost none of its above-chance gain."""
    model = headlens.load("toy-induction-2l")
    tokens, half = eval_tokens(model, n_seqs=24)
    c = task_controls(model, RepeatedHalfTask(tokens, half))
    assert c["full"] < c["chance"] - 1 and c["needs_attention"] is True
    assert c["kept_uniform"] < 0.3 and c["kept_ablated"] < 0.3


def test_the_default_report_task_needs_attention(minilm):
    """``headlens report``'s own task (bundled MiniLM, its first 48 paraphrase triples): the full
    model is clearly above chance, and without attention next to none of that is left. The
    word-order triples would need attention too, but MiniLM does not solve them (below chance), so
    they cannot be the default."""
    from headlens.importance.tasks.loading import default_task_name

    task = load_task(default_task_name(minilm), minilm, n_examples=48)
    c = task_controls(minilm, task)
    assert task.name == "paraphrase" and c["chance"] == 0.0
    assert c["full"] > 10 * c["full_se"] and (c["clean"] > 0).mean() > 0.75
    assert c["needs_attention"] is True and c["kept_ablated"] < 0.1 and c["kept_uniform"] < 0
    order = task_controls(minilm, load_task("word-order", minilm, n_examples=48))
    assert order["full"] < order["chance"] and order["above_chance"] is False
    assert order["kept_uniform"] is None and order["needs_attention"] is None  # no gain to keep: no verdict

"""Capturing patterns: shapes, padding, hooks removed on error, streaming equals in-memory."""
import pytest
import torch

from headlens.data.corpora import bundled_sentences, read_texts
from headlens.errors import HeadlensError
from headlens.patterns.capture import HeadStatsAccumulator, capture_patterns, stream_head_stats

TEXTS = ["The cat sat on the mat.", "A much longer sentence, with commas, goes here for padding.",
         "Short one.", "Heads attend to tokens; some attend to the previous token."]


@pytest.fixture(scope="module")
def tiny_bert(make_tiny_bert):
    """A random 2-layer BERT encoder (4 heads, d_model 32) in headlens: padding matters here."""
    return make_tiny_bert(seed=0)


def no_hooks_left(model) -> bool:
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


def test_shapes_and_rows(tiny_gpt2):
    batches = capture_patterns(tiny_gpt2, TEXTS, batch_size=3)
    assert [pb.patterns.shape[0] for pb in batches] == [3, 1]
    pb = batches[0]
    B, N, P, S = pb.patterns.shape
    assert N == 12 and P == S == pb.input_ids.shape[1]
    assert pb.layer(1).shape == (B, 4, P, S)
    assert torch.equal(pb.layer(2), pb.patterns[:, 8:12])
    rows = pb.patterns.sum(-1)[pb.query_mask[:, None].expand(B, N, P)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    # causal: no attention to later keys
    assert pb.patterns.triu(1).abs().max() == 0


def test_padded_keys_get_zero_and_patterns_do_not_change(tiny_bert):
    (pb,) = capture_patterns(tiny_bert, TEXTS, batch_size=4)
    real = pb.query_mask
    assert not real.all(), "the batch must contain padding for this test"
    assert pb.patterns.masked_select(~real[:, None, None, :]).abs().max() == 0
    for b, text in enumerate(TEXTS):
        (alone,) = capture_patterns(tiny_bert, [text])
        T = alone.patterns.shape[-1]
        assert int(real[b].sum()) == T
        assert torch.allclose(pb.patterns[b, :, :T, :T], alone.patterns[0], atol=1e-5)


def test_hooks_removed_even_on_error(tiny_gpt2):
    bad = [[1, 2, 3], [4, 5, 6], [7, tiny_gpt2.cfg.vocab_size + 5, 8]]  # third item: id out of range
    with pytest.raises(HeadlensError, match="lie in"):
        capture_patterns(tiny_gpt2, bad, batch_size=2)
    assert no_hooks_left(tiny_gpt2)
    capture_patterns(tiny_gpt2, TEXTS[:1])
    assert no_hooks_left(tiny_gpt2)


def test_stream_equals_in_memory(tiny_bert):
    def stat(pb):  # per example: each head's attention summed over real queries to key 0
        return (pb.patterns[..., 0] * pb.query_mask[:, None]).sum(-1), pb.query_mask.sum(-1)

    acc = stream_head_stats(tiny_bert, iter(TEXTS * 3), {"k0": stat}, batch_size=5)
    total, count = 0, 0
    for pb in capture_patterns(tiny_bert, TEXTS * 3, batch_size=2):
        t, c = stat(pb)
        total, count = total + t.sum(0), count + c.sum()
    assert torch.allclose(acc.mean("k0").float(), total / count, atol=1e-6)
    assert acc.n_examples == 12
    # only running sums are kept: their size does not depend on the amount of data
    small = stream_head_stats(tiny_bert, TEXTS[:1], {"k0": stat})
    assert small.totals["k0"].shape == acc.totals["k0"].shape == (8,)


def test_bootstrap_replicates_are_weighted_means():
    acc = HeadStatsAccumulator(n_replicates=4, seed=3)
    totals = torch.arange(12.0).reshape(6, 2)
    counts = torch.tensor([1.0, 2, 1, 3, 1, 2])
    acc.start_batch(6)
    weights = acc._weights.clone()
    acc.add("x", totals, counts)
    expected = (weights @ totals.double()) / (weights @ counts.double())[:, None]
    assert torch.allclose(acc.replicate_means("x"), expected)
    assert torch.allclose(acc.mean("x"), totals.sum(0).double() / counts.sum())
    again = HeadStatsAccumulator(n_replicates=4, seed=3)
    again.start_batch(6)
    assert torch.equal(again._weights, weights)


def test_bad_input(tiny_gpt2):
    with pytest.raises(HeadlensError, match="batch_size"):
        capture_patterns(tiny_gpt2, TEXTS, batch_size=0)
    with pytest.raises(HeadlensError, match="empty"):
        capture_patterns(tiny_gpt2, [])
    with pytest.raises(HeadlensError, match="empty"):
        stream_head_stats(tiny_gpt2, iter([]), {"x": lambda pb: None})
    with pytest.raises(HeadlensError, match="statistics"):
        stream_head_stats(tiny_gpt2, TEXTS, {})
    with pytest.raises(HeadlensError, match="no statistic"):
        HeadStatsAccumulator().mean("nothing")
    with pytest.raises(HeadlensError, match="does not exist"):
        read_texts("/nonexistent/file.txt")


def test_bundled_sentences_are_real_english():
    sentences = bundled_sentences()
    assert 300 <= len(sentences) <= 500
    assert len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 8 for s in sentences)
    assert bundled_sentences(5) == sentences[:5]

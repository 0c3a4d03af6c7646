"""The streaming ablation (a head restricted to sink + recent window after the context): the fast
sweep, which reruns only the positions after the context from a KV cache, equals the naive loop
of full forward passes with masked scores, per head and per key/value head."""
import numpy as np
import pytest
import torch
import transformers

import headlens
from headlens.errors import HeadlensError
from headlens.importance.ablation import ablate
from headlens.importance.streaming import Streaming, hidden_keys
from headlens.importance.sweep import ablation_sweep, sweep_metrics
from headlens.longcontext.tasks import LongContextTask

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = Streaming(sink=2, window=3)


@pytest.fixture(scope="module")
def gqa_model(bert_tokenizer):
    config = transformers.LlamaConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return headlens.from_hf_model(hf, bert_tokenizer)


@pytest.fixture(scope="module")
def task():
    """Six examples, contexts of 14..19 tokens, rows of unequal length (right padding)."""
    gen = torch.Generator().manual_seed(3)
    tokens, context, start = [], [], []
    for i in range(6):
        c = 14 + i
        n = c + 3 + (i % 3)
        tokens.append(torch.randint(1000, 3000, (n,), generator=gen).tolist())
        context.append(c)
        start.append(c + 1)
    return LongContextTask(tokens, context, start)


def test_hidden_keys_are_the_streaming_cache_complement():
    hide = hidden_keys(SPEC, torch.tensor([10]), P=12, S=12)[0, 0]
    assert not hide[:10].any()  # queries inside the context see everything
    for q in (10, 11):  # after it: sink 0, 1 and the last 3 context keys 7, 8, 9, and the new keys
        assert hide[q].nonzero()[:, 0].tolist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("units", ["heads", "kv_heads"])
def test_fast_streaming_sweep_equals_naive(gqa_model, task, units):
    _, clean_f, fast = sweep_metrics(gqa_model, task, SPEC, units=units, batch_size=4, progress=False)
    pairs, clean_n, naive = sweep_metrics(gqa_model, task, SPEC, units=units, method="naive", batch_size=4,
                                          progress=False)
    assert len(pairs) == (12 if units == "heads" else 6)
    np.testing.assert_allclose(clean_f, clean_n, atol=1e-6)
    spread = max(np.abs(naive[p] - clean_n).max() for p in pairs)
    assert spread > 1e-3  # the restriction matters on this model
    for p in pairs:
        np.testing.assert_allclose(fast[p], naive[p], atol=2e-5)


def test_kv_head_unit_is_its_query_heads_together(gqa_model, task):
    table = ablation_sweep(gqa_model, task, SPEC, units="kv_heads", n_bootstrap=100, batch_size=3, progress=False)
    clean = task.evaluate(gqa_model, batch_size=3)
    for layer, kv in [(0, 1), (2, 0)]:
        heads = [(layer, h) for h in (2 * kv, 2 * kv + 1)]  # group size 2
        joint = ablate(gqa_model, task, heads, SPEC, batch_size=3)
        row = table[(table["layer"] == layer) & (table["head"] == kv)].iloc[0]
        assert row.importance == pytest.approx(float((joint - clean).mean()), abs=2e-5)
        assert row.importance_ci_low <= row.importance <= row.importance_ci_high


def test_a_window_covering_the_context_changes_nothing(gqa_model, task):
    table = ablation_sweep(gqa_model, task, Streaming(sink=0, window=64), n_bootstrap=0, progress=False)
    assert np.abs(table.importance).max() < 1e-6


def test_streaming_needs_context_lengths(gqa_model):
    from headlens.importance.tasks import LMLossTask

    with pytest.raises(HeadlensError, match="context_len"):
        ablation_sweep(gqa_model, LMLossTask(["one two three four", "five six seven"]), "streaming",
                       n_bootstrap=0, progress=False)

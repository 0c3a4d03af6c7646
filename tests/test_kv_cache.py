"""The model's KV cache: a continuation run from a prefilled cache equals the full forward pass and
transformers' own ``past_key_values`` decoding; a frozen cache serves many continuations."""
import pytest
import torch
import transformers

import headlens
from headlens.errors import HeadlensError
from headlens.model.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(kind: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  max_position_embeddings=64, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    else:  # a sliding window shorter than the cached prefix
        config = transformers.MistralConfig(**common, sliding_window=6)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, bert_tokenizer):
    hf = _hf(request.param, bert_tokenizer.vocab_size)
    return hf, headlens.from_hf_model(hf, bert_tokenizer)


def test_continuation_from_a_cache_equals_the_full_pass_and_transformers(pair):
    hf, model = pair
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg.n_layers)
        model(ids[:, :13], past_kv=cache)
        assert cache.length == 13 and not cache.frozen
        tail = model(ids[:, 13:], past_kv=cache.freeze())
        assert cache.length == 13  # frozen: read, not extended
        again = model(ids[:, 13:], past_kv=cache)
        hf_cache = transformers.DynamicCache()
        hf(ids[:, :13], past_key_values=hf_cache, use_cache=True)
        hf_tail = hf(ids[:, 13:], past_key_values=hf_cache, use_cache=True).logits
    assert torch.allclose(tail, full[:, 13:], atol=1e-5)
    assert torch.equal(tail, again)
    assert torch.allclose(tail, hf_tail, atol=1e-4)


def test_open_cache_decodes_token_by_token(pair):
    _, model = pair
    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg.n_layers)
        steps = [model(ids[:, :8], past_kv=cache)[:, -1]] + [model(ids[:, i:i + 1], past_kv=cache)[:, -1]
                                                            for i in range(8, 12)]
    assert cache.length == 12
    assert torch.allclose(torch.stack(steps, 1), full[:, 7:], atol=1e-5)


def test_cache_and_attention_mask_shapes_are_checked(pair):
    _, model = pair
    ids = torch.randint(5, 500, (2, 10))
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        model(ids[:, :6], past_kv=cache)
        with pytest.raises(HeadlensError, match="attention_mask must have the shape \\(2, 10\\)"):
            model(ids[:, 6:], past_kv=cache.freeze(), attention_mask=torch.ones(2, 4, dtype=torch.long))
        with pytest.raises(HeadlensError, match="past_kv holds 2 rows"):
            model(ids[:1, 6:], past_kv=cache)
        with pytest.raises(HeadlensError, match="exceeds the model's context"):
            model(torch.randint(5, 500, (2, 60)), past_kv=cache)

"""TransformerLens' surface on HeadlensModel, checked against transformers and against its own
definitions: the loss, greedy and sampled generation (with and without the key/value cache), direct
logit attribution, weight processing, the per-head input switches, hook_result's opt-in, the norm
hooks and the default task of models without a tokenizer. The demo cells against TransformerBridge
are in tests/test_tl_demos.py."""
import copy

import pytest
import torch
import transformers

import headlens
from headlens.errors import HeadlensError
from headlens.model.tokens import encode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama_hf(bert_tokenizer):
    """Grouped-query attention (4 query, 2 key/value heads), RMSNorm, rotary, tied embeddings."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=101,
                                   eos_token_id=102, attn_implementation="eager", initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_hf, bert_tokenizer):
    return headlens.from_hf_model(copy.deepcopy(tiny_llama_hf), bert_tokenizer)


IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 2944, 2000, 2156],
                    [101, 1037, 2742, 6251, 2005, 2023, 2944, 2024, 2200, 102]])


def test_to_tokens_and_the_token_helpers(tiny_gpt2_hf, gpt2_tokenizer):
    tiny_gpt2 = headlens.from_hf_model(tiny_gpt2_hf, gpt2_tokenizer)  # GPT-2's tokenizer adds no [SEP]
    tiny_gpt2.cfg.bos_token_id = gpt2_tokenizer.bos_token_id
    tokens = tiny_gpt2.to_tokens(["a test", "a longer test here"])
    assert tokens.ndim == 2 and tokens.shape[0] == 2 and tokens[0, 0] == tiny_gpt2.cfg.bos_token_id
    left = tiny_gpt2.to_tokens(["a test", "a longer test here"], padding_side="left")
    assert left.shape == tokens.shape and left[0, -3:].tolist() == tokens[0, :3].tolist()
    assert encode(tiny_gpt2, ["a test", "a longer test here"], padding_side="left")["attention_mask"][0].tolist() \
        == [0, 0, 1, 1, 1]
    assert tiny_gpt2.to_tokens("test", prepend_bos=False)[0, 0] != tiny_gpt2.cfg.bos_token_id
    word = tiny_gpt2.to_single_token("test")
    assert tiny_gpt2.to_str_tokens(torch.tensor([word])) == ["test"]
    positions = [tiny_gpt2.get_token_position(" test", "a test and a test", mode=m) for m in ("first", "last")]
    assert positions == [2, 5]  # after the BOS token
    assert "a test" in tiny_gpt2.to_string(tiny_gpt2.to_tokens("a test")[0])
    with pytest.raises(HeadlensError, match="not a single token"):
        tiny_gpt2.to_single_token("a test")
    with pytest.raises(HeadlensError, match="does not occur"):
        tiny_gpt2.get_token_position(" test", "nothing here")
    with pytest.raises(HeadlensError, match="no tokenizer"):
        headlens.load("toy-induction-1l").to_tokens("text")


def test_loss_equals_transformers(tiny_llama, tiny_llama_hf):
    with torch.no_grad():
        ref = tiny_llama_hf(IDS, labels=IDS).loss
        loss = tiny_llama(IDS, return_type="loss")
        logits, both = tiny_llama(IDS, return_type="both")
        per_token = tiny_llama(IDS, return_type="loss", loss_per_token=True)
    assert abs(loss.item() - ref.item()) < 1e-5 and torch.equal(loss, both)
    assert per_token.shape == (2, IDS.shape[1] - 1) and abs(per_token.mean().item() - ref.item()) < 1e-5
    with torch.no_grad():  # padding (and the token after it) is left out, as TL's lm_cross_entropy_loss does
        mask = torch.ones_like(IDS)
        mask[1, 6:] = 0
        padded = tiny_llama(IDS, attention_mask=mask, return_type="loss")
        ref_padded = tiny_llama_hf(IDS, attention_mask=mask, labels=IDS.masked_fill(mask == 0, -100)).loss
    assert abs(padded.item() - ref_padded.item()) < 1e-5


def test_loss_needs_a_causal_language_model(make_tiny_bert):
    with pytest.raises(HeadlensError, match="needs a causal language model"):
        make_tiny_bert(0)(IDS, return_type="loss")
    with pytest.raises(HeadlensError, match="return_type must be one of"):
        make_tiny_bert(0)(IDS, return_type="probs")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_equals_transformers_with_and_without_the_cache(family, tiny_gpt2, tiny_gpt2_hf,
                                                                         tiny_llama, tiny_llama_hf):
    model, hf = (tiny_gpt2, tiny_gpt2_hf) if family == "gpt2" else (tiny_llama, tiny_llama_hf)
    prompts = torch.tensor([[0, 0, 101, 2023, 2003, 1037], [101, 1037, 2742, 6251, 2005, 2023]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
    with torch.no_grad():
        ref = hf.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for use_cache in (True, False):
            out = model._decode_loop(prompts, mask, 8, [], use_cache, False, dict(temperature=0.0))
            assert torch.equal(out, ref), use_cache
        single = model.generate(prompts[1:], max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(single, ref[1:])


def test_sampling_options_and_stop_tokens(tiny_gpt2):
    greedy = tiny_gpt2.generate("a test", max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert greedy.startswith("a test") or "a test" in greedy
    ids = tiny_gpt2.to_tokens("a test")
    kw = dict(max_new_tokens=5, stop_at_eos=False, verbose=False)
    top1 = tiny_gpt2.generate(ids, top_k=1, seed=3, **kw)
    nucleus = tiny_gpt2.generate(ids, top_p=1e-6, seed=3, **kw)
    assert torch.equal(top1, tiny_gpt2.generate(ids, do_sample=False, **kw)) and torch.equal(top1, nucleus)
    hot = [tiny_gpt2.generate(ids, temperature=5.0, seed=s, **kw) for s in (0, 0, 1)]
    assert torch.equal(hot[0], hot[1]) and not torch.equal(hot[0], hot[2])
    first = int(top1[0, ids.shape[1]])  # stop at the first generated token: the rest is padded with it
    stopped = tiny_gpt2.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=first, verbose=False)
    assert stopped.shape[1] == ids.shape[1] + 1 and stopped[0, -1] == first


def _dla_gap(model, prompt_ids, right: int, wrong: int) -> float:
    """|per-head attributions + remainder + b_U[right] - b_U[wrong] - the model's logit difference|."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompt_ids)
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, incl_remainder=True)
        attrs = cache.logit_attrs(stack, tokens=torch.tensor([right]), incorrect_tokens=torch.tensor([wrong]),
                                  pos_slice=-1)
    assert attrs.shape == (model.cfg.n_layers * model.cfg.n_heads + 1, 1)
    total = attrs.sum() + model.b_U[right] - model.b_U[wrong]
    return abs((total - (logits[0, -1, right] - logits[0, -1, wrong])).item())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_direct_logit_attribution_per_head_reconstructs_the_logit_difference(family, tiny_gpt2, tiny_llama):
    raw = copy.deepcopy(tiny_gpt2 if family == "gpt2" else tiny_llama)
    with torch.no_grad():  # norm weights far from 1, so that folding them matters
        for block in raw.blocks:
            block.ln1.weight.mul_(torch.linspace(0.5, 2.0, raw.cfg.d_model))
        raw.ln_final.weight.mul_(torch.linspace(2.0, 0.3, raw.cfg.d_model))
    processed = copy.deepcopy(raw).process_weights()
    assert _dla_gap(processed, IDS[:1], 2003, 1037) < 1e-4
    assert _dla_gap(raw, IDS[:1], 2003, 1037) > 1e-2  # without the folded final norm it does not add up


def _hf_model(family: str, vocab_size: int):
    """GPT-NeoX (parallel blocks, partial rotary) or Gemma 2 (norms around each sublayer with a
    ``1 + w`` scale, soft-capped scores and logits), random weights pushed away from their init."""
    torch.manual_seed(2)
    common = dict(vocab_size=vocab_size, hidden_size=36, num_hidden_layers=2, max_position_embeddings=64,
                  attn_implementation="eager")
    if family == "neox":
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **common, num_attention_heads=6, intermediate_size=64, rotary_pct=0.5))
    else:
        hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=44,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "gemma2"])
def test_process_weights_keeps_the_model_s_predictions(family, tiny_gpt2, tiny_llama, bert_tokenizer):
    if family in ("neox", "gemma2"):
        model = headlens.from_hf_model(_hf_model(family, bert_tokenizer.vocab_size), bert_tokenizer)
    else:
        model = tiny_gpt2 if family == "gpt2" else tiny_llama
    processed = copy.deepcopy(model).process_weights()
    with torch.no_grad():
        before, after = model(IDS).log_softmax(-1), processed(IDS).log_softmax(-1)
    assert (before - after).abs().max() < 1e-4  # centring the unembedding shifts logits, not probabilities
    assert processed.cfg.normalization_type.endswith("Pre") and not processed.cfg.tie_embeddings
    for block in processed.blocks:  # the norms before the sublayers now scale by 1
        w = block.ln1.weight
        assert torch.equal(1 + w if getattr(block.ln1, "offset", False) else w, torch.ones_like(w))


def test_process_weights_refuses_post_norm_models(make_tiny_bert):
    with pytest.raises(HeadlensError, match="post-norm"):
        make_tiny_bert(0).process_weights()


def test_per_head_inputs_change_nothing_until_one_head_is_patched(tiny_llama):
    model, seen = copy.deepcopy(tiny_llama), {}

    def zero_kv_head_1(t, hook):
        t[:, :, 1] = 0.0
        return t

    def keep(t, hook):
        seen["pattern"] = t.clone()

    with torch.no_grad():
        ref = model(IDS)
        model.set_use_split_qkv_input(True)
        split, cache = model.run_with_cache(IDS)
        model.run_with_hooks(IDS, fwd_hooks=[("blocks.0.hook_k_input", zero_kv_head_1),
                                             ("blocks.0.attn.hook_pattern", keep)])
        with pytest.raises(HeadlensError, match="mutually exclusive"):
            model.set_use_attn_in(True)
        model.set_use_split_qkv_input(False)
        model.set_use_attn_in(True)
        attn_in, in_cache = model.run_with_cache(IDS)
    assert cache["blocks.0.hook_k_input"].shape == (2, IDS.shape[1], 2, 32)  # one copy per key/value head
    assert cache["blocks.0.hook_q_input"].shape == (2, IDS.shape[1], 4, 32)
    assert in_cache["blocks.0.hook_attn_in"].shape == (2, IDS.shape[1], 4, 32)
    assert (split - ref).abs().max() < 1e-5 and (attn_in - ref).abs().max() < 1e-5
    diff = (seen["pattern"] - cache["blocks.0.attn.hook_pattern"]).abs().amax((0, 2, 3))
    assert diff[:2].max() < 1e-6 and diff[2:].min() > 1e-3  # query heads 2, 3 read key/value head 1


def test_hook_result_is_cached_only_when_asked_for(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        _, cache = model.run_with_cache(IDS)
        assert "blocks.0.attn.hook_result" not in cache.cache_dict
        model.set_use_attn_result(True)
        _, cache = model.run_with_cache(IDS)
    result = cache["result", 0, "attn"]
    assert result.shape == (2, IDS.shape[1], model.cfg.n_heads, model.cfg.d_model)
    assert (result.sum(2) + model.blocks[0].attn.b_O - cache["attn_out", 0]).abs().max() < 1e-5


def test_norm_hooks_read_and_edit_the_norms(tiny_gpt2, tiny_llama):
    for model in (tiny_gpt2, tiny_llama):
        with torch.no_grad():
            ref, cache = model.run_with_cache(IDS)
            ln = model.blocks[1].ln1
            bias = ln.bias if getattr(ln, "bias", None) is not None else 0.0
            resid = cache["resid_pre", 1]
            centred = resid - resid.mean(-1, keepdim=True) if model.cfg.norm == "layernorm" else resid
            assert (cache["blocks.1.ln1.hook_scale"] * cache["blocks.1.ln1.hook_normalized"] - centred).abs().max() < 1e-4
            assert (cache["blocks.1.ln1.hook_normalized"] * ln.weight + bias - ln(resid)).abs().max() < 1e-5

            def double(t, hook):
                t.mul_(2.0)  # an in-place edit takes effect

            edited = model.run_with_hooks(IDS, fwd_hooks=[("ln_final.hook_scale", double)])
        assert (edited - ref).abs().max() > 1e-3


def test_models_without_a_tokenizer_get_a_repeated_token_task():
    from headlens.importance.tasks import default_task_name, load_task
    from headlens.importance.tasks.types import RepeatedHalfTask

    model = headlens.load("toy-induction-2l")
    assert default_task_name(model) == "repeated"
    task = load_task("repeated", model, n_examples=6)
    assert isinstance(task, RepeatedHalfTask) and len(task) == 6
    clean = task.evaluate(model, batch_size=6)
    assert clean.mean() < 0.5  # the toy's induction heads predict the repeated half

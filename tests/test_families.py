"""LLaMA, Qwen2, Mistral and GPT-NeoX: headlens loaded from a saved transformers folder equals
transformers (eager) and TransformerLens' TransformerBridge, head by head, in float32.

Each case is a random-initialised model of small odd shape (3 layers; grouped-query, multi-query
and multi-head attention; partial and odd rotary; a sliding window shorter than the input; rope
scaling; attention / MLP biases; tied and untied embeddings). Every parameter is redrawn
(std 0.3; norm weights 1 +- 0.3) so that patterns are peaked and a bias or norm weight read into
the wrong place shows up in the outputs.
"""
import copy
from pydoc_data.topics import topics

import pytest
import torch
import transformers

import headlens
from headlens.io.families.llama import config_from_hf as llama_config
from headlens.model.tokens import encode

TOL = 1e-4
TEXTS = [topics["assert"][:70], topics["pass"][:40]]  # two lengths: right padding in the batch


def hf_config(case: str, vocab_size: int, special: dict):
    common = dict(vocab_size=vocab_size, hidden_size=36, intermediate_size=44, num_hidden_layers=3,
                  max_position_embeddings=64, **special)
    if case == "llama":  # GQA 6 over 2, head_dim != hidden / heads, all biases, llama3 rope scaling
        return transformers.LlamaConfig(
            **common, num_attention_heads=6, num_key_value_heads=2, head_dim=8, attention_bias=True,
            mlp_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16})
    if case == "qwen2":  # multi-query (1 kv head), q/k/v biases only, tied embeddings, linear rope
        return transformers.Qwen2Config(
            **common, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0})
    if case == "mistral":  # GQA, head_dim 12, sliding window of 5 < sequence length
        return transformers.MistralConfig(**common, num_attention_heads=6, num_key_value_heads=2,
                                          head_dim=12, sliding_window=5)
    if case == "gpt_neox":  # parallel blocks, rotary on 3 of 12 features (odd: rotates 4)
        return transformers.GPTNeoXConfig(**common, num_attention_heads=3, rotary_pct=0.25,
                                          hidden_act="gelu")
    if case == "gpt_neox_sequential":  # sequential blocks, half rotary, 6 heads of 6
        return transformers.GPTNeoXConfig(**common, num_attention_heads=6, rotary_pct=0.5,
                                          use_parallel_residual=False, hidden_act="gelu_new")
    raise KeyError(case)


CASES = ["llama", "qwen2", "mistral", "gpt_neox", "gpt_neox_sequential"]


@pytest.fixture(scope="module", params=CASES)
def case(request, bert_tokenizer, tmp_path_factory):
    """``(name, folder, transformers model, headlens model loaded from the folder)``."""
    name = request.param
    tok = bert_tokenizer
    special = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                   pad_token_id=tok.pad_token_id)
    # a few rows more than the tokenizer: transformers reads the folder's tokenizer with the
    # model type's class, and Qwen2's adds <|endoftext|>
    config = hf_config(name, tok.vocab_size + 6, special)
    config._attn_implementation = "eager"
    torch.manual_seed(CASES.index(name))
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a wide spread: peaked patterns, every bias and norm weight matters
        for pname, p in hf.named_parameters():
            noise = 0.3 * torch.randn_like(p)
            p.copy_(1 + noise if p.ndim == 1 and pname.endswith("weight") else noise)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return name, folder, hf, headlens.load(folder)


def _batch(model):
    batch = encode(model, TEXTS)
    assert batch["attention_mask"].sum(1).tolist()[0] > 5 + batch["attention_mask"].sum(1).tolist()[1]
    return batch


def _max_error_on_real_tokens(a, b, mask, dim_query):
    """Largest |a - b| over real (unpadded) query positions; ``dim_query``: the query axis."""
    keep = mask.bool()
    shape = [1] * a.ndim
    shape[0], shape[dim_query] = mask.shape
    return (a - b).abs().masked_fill(~keep.view(shape), 0).max().item()


def test_parity_with_transformers(case):
    name, _, hf, model = case
    batch = _batch(model)
    with torch.no_grad():
        ref = hf(**batch, output_attentions=True)
        logits, cache = model.run_with_cache(batch)
    mask = batch["attention_mask"]
    assert model.cfg.family == name.removesuffix("_sequential")
    assert _max_error_on_real_tokens(logits, ref.logits, mask, 1) < TOL
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert ours.shape == ref.attentions[layer].shape
        assert _max_error_on_real_tokens(ours, ref.attentions[layer], mask, 2) < TOL, layer


def test_parity_with_transformer_bridge(case, bert_tokenizer):
    """The bridge wraps (and renames) the transformers modules and may add tokens to its tokenizer,
    so it gets fresh copies of both."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformer_lens.model_bridge import TransformerBridge

    name, folder, _, model = case
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    if type(hf).__name__ not in SUPPORTED_ARCHITECTURES:  # the one reason to skip: TL has no adapter
        pytest.skip(f"{type(hf).__name__} is not among TransformerLens' supported bridge architectures")
    bridge = TransformerBridge.boot_transformers(type(hf).__name__, hf_model=hf,
                                                tokenizer=copy.deepcopy(bert_tokenizer))
    ids = model.to_tokens(TEXTS[:1])
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(ids)
        logits, cache = model.run_with_cache(ids)
    assert (logits - ref_logits).abs().max() < TOL
    # TransformerLens' hook_q / hook_k are before rotary, hook_rot_q / hook_rot_k after it
    pairs = [(name, name) for name in ("hook_pattern", "hook_v", "hook_z", "hook_q", "hook_k", "hook_rot_q",
                                       "hook_rot_k")]
    compared = 0
    for layer in range(model.cfg.n_layers):
        for ours, theirs in pairs:
            key = f"blocks.{layer}.attn.{theirs}"
            if key not in ref.cache_dict:
                continue
            assert cache[f"blocks.{layer}.attn.{ours}"].shape == ref[key].shape, key
            assert (cache[f"blocks.{layer}.attn.{ours}"] - ref[key]).abs().max() < TOL, key
            compared += 1
    assert compared >= 3 * model.cfg.n_layers


def test_config_reads_the_architecture(case):
    name, _, hf, model = case
    cfg, c = model.cfg, hf.config
    n_kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    assert (cfg.n_heads, cfg.n_kv_heads) == (c.num_attention_heads, n_kv)
    expected = {"llama": dict(norm="rmsnorm", mlp="swiglu", qkv_bias=True, out_bias=True, mlp_bias=True,
                              sliding_window=None, tie_embeddings=False, d_head=8, n_kv_heads=2),
                "qwen2": dict(norm="rmsnorm", qkv_bias=True, out_bias=False, mlp_bias=False,
                              tie_embeddings=True, n_kv_heads=1, rotary_base=1000.0),
                "mistral": dict(qkv_bias=False, out_bias=False, sliding_window=5, d_head=12),
                "gpt_neox": dict(norm="layernorm", parallel_block=True, rotary_dim=3, d_head=12, mlp="gelu"),
                "gpt_neox_sequential": dict(parallel_block=False, rotary_dim=3, d_head=6,
                                            mlp="gelu_new")}[name]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.rotary_scaling == {"llama": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                  "qwen2": {"rope_type": "linear", "factor": 2.0}}.get(name)
    attn = model.blocks[0].attn
    assert attn.kv_map.tolist() == [h // cfg.group_size for h in range(cfg.n_heads)]
    _, cache = model.run_with_cache(torch.tensor([[5, 6, 7]]))
    assert cache["blocks.0.attn.hook_k"].shape == (1, 3, cfg.n_kv_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_q"].shape == (1, 3, cfg.n_heads, cfg.d_head)


def test_gating_a_query_head_equals_zeroing_its_z(case):
    """Under GQA a query head's gate removes that head only, not the others of its group."""
    _, _, _, model = case
    ids = model.to_tokens(TEXTS[:1])
    layer, head = 1, model.cfg.n_heads - 1
    gate = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    gate[layer, head] = 0.0

    def zero_z(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        clean = model(ids)
        gated = model(ids, head_gate=gate)
        hooked = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_z)])
        _, cache = model.run_with_cache(ids, head_gate=gate)
        model.set_attn_implementation("eager")  # every layer explicit, as the gated run
        try:
            hooked_eager = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_z)])
        finally:
            model.set_attn_implementation("sdpa")
    assert (gated - hooked_eager).abs().max() < 1e-6
    assert (gated - hooked).abs().max() < TOL  # the other layers ran sdpa there
    assert (gated - clean).abs().max() > 1e-3
    z = cache[f"blocks.{layer}.attn.hook_z"]
    assert z[:, :, head].abs().max() == 0 and z[:, :, :head].abs().max() > 0


def test_physically_pruned_config_equals_gating(case, tmp_path):
    """cfg.kept_heads: keep a key/value head while any of its query heads remains; the sliced model
    equals the full model with the removed heads gated off, and survives export + load."""
    _, _, _, model = case
    cfg = model.cfg
    H = cfg.n_heads
    kept = [[0], list(range(1, H)), [h for h in range(H) if h % 2 == 0]]
    pruned_cfg = cfg.replace(kept_heads=kept)
    for layer, heads in enumerate(kept):
        assert pruned_cfg.kv_heads_in_layer(layer) == sorted({h // cfg.group_size for h in heads})
    pruned = headlens.HeadlensModel.from_state_dict(pruned_cfg, _kept_state(model, kept), model.tokenizer)
    gate = torch.zeros(cfg.n_layers, H)
    for layer, heads in enumerate(kept):
        gate[layer, heads] = 1.0
    ids = model.to_tokens(TEXTS[:1])
    with torch.no_grad():
        expected = model(ids, head_gate=gate)
        assert (pruned(ids) - expected).abs().max() < TOL
    assert pruned.head_labels() == [(l, h) for l, hs in enumerate(kept) for h in hs]

    from headlens.io.to_hf import save_hf

    back = headlens.load(save_hf(pruned, tmp_path / "pruned"))
    assert back.cfg.kept_heads == kept
    with torch.no_grad():
        assert (back(ids) - expected).abs().max() < TOL


def test_export_round_trip(case, tmp_path):
    """headlens.io.to_hf.save_hf writes a folder transformers reads into the same model."""
    from headlens.io.to_hf import exportable_families, save_hf

    name, _, hf, model = case
    if model.cfg.family not in exportable_families():
        with pytest.raises(headlens.HeadlensError, match="cannot be exported"):
            save_hf(model, tmp_path / "out")
        return
    save_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             attn_implementation="eager").eval()
    assert type(back) is type(hf)
    ids = model.to_tokens(TEXTS[:1])
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < TOL


def test_loads_in_the_dtype_asked_for(case):
    """bfloat16 weights are the float32 weights rounded once (not a second conversion path)."""
    name, folder, _, model = case
    half = headlens.load(folder, dtype="bfloat16")
    full = dict(model.state_dict())
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for k, v in half.state_dict().items():
        assert torch.equal(v, full[k].to(torch.bfloat16)), k
    with torch.no_grad():
        assert half(model.to_tokens(TEXTS[:1])).isfinite().all()


@pytest.mark.parametrize("config, message", [
    (transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type 'yarn'"),
    (transformers.LlamaConfig(hidden_act="relu"), "hidden_act 'relu'"),
])
def test_unsupported_configurations_are_refused(config, message):
    with pytest.raises(headlens.HeadlensError, match=message):
        llama_config(config)


def test_families_are_registered():
    from headlens.io.families import FAMILIES, family_for_model_type

    for model_type in ("llama", "qwen2", "mistral", "gpt_neox"):
        assert family_for_model_type(model_type).name == model_type
        assert FAMILIES[model_type].description


@pytest.mark.parametrize("kind", ["zero", "mean", "resample", "uniform"])
def test_fast_sweep_equals_naive_loop(case, kind):
    """The fast sweep's per-head shortcut (grouped-query values, parallel blocks, rotary, a
    sliding window, a physically pruned layer) equals one hooked forward per head."""
    from headlens.importance.sweep import ablation_sweep
    from headlens.importance.tasks import LMLossTask

    _, _, _, model = case
    kept = [[0], list(range(1, model.cfg.n_heads)), list(range(model.cfg.n_heads))]
    pruned = headlens.HeadlensModel.from_state_dict(
        model.cfg.replace(kept_heads=kept), _kept_state(model, kept), model.tokenizer)
    task = LMLossTask([topics["assert"][:60], topics["pass"][:30], topics["if"][:45]])
    for m in (model, pruned):
        args = dict(ablation=kind, batch_size=2, n_bootstrap=0, progress=False)
        fast = ablation_sweep(m, task, memory_budget_mb=0.01, **args)
        naive = ablation_sweep(m, task, method="naive", **args)
        assert (fast["importance"] - naive["importance"]).abs().max() < 1e-4
        assert fast["importance"].abs().max() > 1e-2  # heads matter: the comparison can fail


def _kept_state(model, kept):
    """The model's weights sliced to ``kept`` query heads per layer (and the key/value heads they read)."""
    cfg = model.cfg.replace(kept_heads=kept)
    state = dict(model.state_dict())
    for layer, heads in enumerate(kept):
        kv = cfg.kv_heads_in_layer(layer)
        p = f"blocks.{layer}.attn."
        for n, idx, dim in (("W_Q", heads, 1), ("b_Q", heads, 0), ("W_O", heads, 0),
                            ("W_K", kv, 1), ("b_K", kv, 0), ("W_V", kv, 1), ("b_V", kv, 0)):
            if p + n in state:
                state[p + n] = state[p + n].index_select(dim, torch.tensor(idx)).clone()
    return state

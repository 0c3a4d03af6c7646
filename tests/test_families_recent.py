"""Gemma 2, Gemma 3 (text), Qwen3, OLMo 2, Phi-3 and a Qwen2 that mixes sliding-window and full
layers: headlens loaded from a saved transformers folder equals transformers (eager) and
TransformerLens' TransformerBridge, head by head, in float32; the fast sweep equals the naive loop;
gradients equal finite differences; pruned models equal gated ones and export back to transformers.

Each case is a random-initialised model (3 layers, grouped-query attention, head_dim != hidden /
heads) whose config turns on what the family adds: soft-caps (Gemma 2 scores and logits, Gemma 3
logits), local layers with a window of 5 tokens (shorter than the 20+ token texts) mixed with
global ones, Gemma 3's separate local / global rotary (linear scaling on the global one), QK-norms
(per head: Qwen3, Gemma 3; over the projection: OLMo 2), post-sublayer norms (Gemma, OLMo 2),
Phi-3's fused projections and partial rotary. Parameters are redrawn with a wide spread (std 0.3;
norm weights 1 +- 0.3, Gemma's (1 + w) norms then scale by about 2) so that every weight read into
the wrong place shows in the outputs.
"""
import copy
from pydoc_data.topics import topics

import pytest
import torch
import transformers

import headlens
from headlens.importance.gradients import gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.io.to_hf import save_hf
from headlens.model.tokens import encode
from headlens.pruning.physical import prune_heads, pruning_refusal

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
TEXTS = [topics["assert"][:70], topics["pass"][:40]]  # two lengths: right padding in the batch
WINDOW = 5
SLIDING, FULL = "sliding_attention", "full_attention"


def hf_config(case: str, vocab_size: int, special: dict):
    common = dict(vocab_size=vocab_size, hidden_size=36, intermediate_size=44, num_hidden_layers=3,
                  max_position_embeddings=64, num_attention_heads=6, **special)
    if case == "gemma2":  # both soft-caps, alternating local / global, q/k/v/o biases, scalar != head_dim
        return transformers.Gemma2Config(
            **common, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=24, sliding_window=WINDOW,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, attention_bias=True)
    if case == "gemma3_text":  # QK-norm, per-type rotary, final soft-cap
        return transformers.Gemma3TextConfig(
            **common, num_key_value_heads=3, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
            layer_types=[SLIDING, FULL, SLIDING], final_logit_softcapping=5.0,
            rope_parameters={FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                             SLIDING: {"rope_type": "default", "rope_theta": 100.0}})
    if case == "qwen3":  # per-head QK-norm, head_dim 10, biases, full then sliding layers
        return transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=10, attention_bias=True,
                                        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if case == "olmo2":  # norms after the sublayers, QK-norm over the whole projection
        return transformers.Olmo2Config(**common, num_key_value_heads=2)
    if case == "phi3":  # fused qkv / gate_up, half rotary, a window on every layer
        return transformers.Phi3Config(**common, num_key_value_heads=2, sliding_window=WINDOW,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.5})
    if case == "qwen2_mixed":  # max_window_layers: two full layers, then a sliding one; one kv head
        return transformers.Qwen2Config(**common, num_key_value_heads=1, use_sliding_window=True,
                                        sliding_window=WINDOW, max_window_layers=2)
    raise KeyError(case)


CASES = ["gemma2", "gemma3_text", "qwen3", "olmo2", "phi3", "qwen2_mixed"]


@pytest.fixture(scope="module", params=CASES)
def case(request, bert_tokenizer, tmp_path_factory):
    """``(name, folder, transformers model, headlens model loaded from the folder)``."""
    name, tok = request.param, bert_tokenizer
    special = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    config = hf_config(name, tok.vocab_size + 6, special)
    config._attn_implementation = "eager"
    torch.manual_seed(CASES.index(name))
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            noise = 0.3 * torch.randn_like(p)
            p.copy_(1 + noise if p.ndim == 1 and pname.endswith("weight") else noise)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return name, folder, hf, headlens.load(folder)


def _max_error_on_real_tokens(a, b, mask, dim_query):
    """Largest |a - b| over real (unpadded) query positions; ``dim_query``: the query axis."""
    shape = [1] * a.ndim
    shape[0], shape[dim_query] = mask.shape
    return (a - b).abs().masked_fill(~mask.bool().view(shape), 0).max().item()


def test_parity_with_transformers(case):
    name, _, hf, model = case
    batch = encode(model, TEXTS)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] > lengths[1] > 2 * WINDOW  # padding, and windows shorter than the texts
    with torch.no_grad():
        ref = hf(**batch, output_attentions=True)
        logits, cache = model.run_with_cache(batch)
    mask = batch["attention_mask"]
    assert model.cfg.family == name.removesuffix("_mixed")
    assert _max_error_on_real_tokens(logits, ref.logits, mask, 1) < TOL
    windows = []
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert ours.shape == ref.attentions[layer].shape
        assert _max_error_on_real_tokens(ours, ref.attentions[layer], mask, 2) < TOL, layer
        windows.append(model.blocks[layer].attn.sliding_window)
    # the features the case is meant to exercise are on
    expected = {"gemma2": [WINDOW, None, WINDOW], "gemma3_text": [WINDOW, None, WINDOW],
                "qwen3": [None, WINDOW, WINDOW], "olmo2": [None] * 3, "phi3": [WINDOW] * 3,
                "qwen2_mixed": [None, None, WINDOW]}[name]
    assert windows == expected
    cfg = model.cfg
    if name.startswith("gemma"):
        assert cfg.norm_position == "sandwich" and cfg.norm_offset and cfg.output_logits_soft_cap == 5.0
        assert cfg.embed_scale == 36 ** 0.5
    assert (cfg.attn_scores_soft_cap, cfg.qk_norm) == {
        "gemma2": (2.0, "none"), "gemma3_text": (None, "head"), "qwen3": (None, "head"),
        "olmo2": (None, "projection")}.get(name, (None, "none"))
    if name == "gemma3_text":
        assert [model.blocks[layer].attn.rotary.base for layer in range(3)] == [100.0, 1e5, 100.0]


def _bridge(folder, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return TransformerBridge.boot_transformers(type(hf).__name__, hf_model=hf, tokenizer=copy.deepcopy(tokenizer))


def test_parity_with_transformer_bridge(case, bert_tokenizer):
    """TL 4.3 supports every one of these families. Its post-norm blocks take ``hook_attn_out``
    after ``ln1_post``; its ``hook_q_normed`` is ``[B, H, P, d]`` (per-head norms) or
    ``[B, P, H*d]`` (OLMo 2) where headlens' is ``[B, P, H, d]``."""
    name, folder, _, model = case
    bridge = _bridge(folder, bert_tokenizer)
    ids = model.to_tokens(TEXTS[:1])
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(ids)
        logits, cache = model.run_with_cache(ids)
    assert (logits - ref_logits).abs().max() < TOL
    rot = "hook_rot_q" if "blocks.0.attn.hook_rot_q" in cache else "hook_q"  # headlens' post-rotary query
    names = ["attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_v", "attn.hook_z", "attn.hook_out",
             "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post", "attn.hook_q_normed",
             "attn.hook_k_normed", ("attn." + rot, "attn.hook_rot_q")]
    compared = set()
    for layer in range(model.cfg.n_layers):
        for ours, theirs in ((n, n) if isinstance(n, str) else n for n in names):
            key = f"blocks.{layer}.{theirs}"
            if key not in ref.cache_dict:
                continue
            a, b = cache[f"blocks.{layer}.{ours}"], ref[key]
            if a.ndim == 4 and b.ndim == 4 and a.shape != b.shape:
                b = b.transpose(1, 2)  # [B, H, P, d] -> [B, P, H, d]
            elif b.ndim == 3 and a.ndim == 4:
                a = a.flatten(-2)  # OLMo 2's norm over the projection: [B, P, H*d]
            assert a.shape == b.shape, key
            if "attn_scores" in key:  # the masked entries are dtype-min in both
                a, b = a.clamp(min=-1e4), b.clamp(min=-1e4)
            assert (a - b).abs().max() < TOL, key
            compared.add(theirs)
    assert {"attn.hook_pattern", "attn.hook_z", "attn.hook_out", "hook_attn_out", "hook_mlp_out"} <= compared
    assert ("attn.hook_q_normed" in compared) == (model.cfg.qk_norm != "none")
    if model.cfg.norm_position in ("sandwich", "output"):  # hook_attn_out is after ln1_post, as in TL
        ln1_post = model.blocks[1].ln1_post
        assert torch.allclose(cache["blocks.1.hook_attn_out"], ln1_post(cache["blocks.1.attn.hook_out"]))


def test_fast_sweep_equals_naive_loop(case):
    """The fast sweep adds each head's change before the post-attention norm (Gemma, OLMo 2): it
    equals one hooked forward per head."""
    _, _, _, model = case
    task = LMLossTask([topics["assert"][:60], topics["if"][:45]])
    args = dict(ablation="zero", batch_size=2, n_bootstrap=0, progress=False)
    fast = ablation_sweep(model, task, memory_budget_mb=0.01, **args)
    naive = ablation_sweep(model, task, method="naive", **args)
    assert (fast["importance"] - naive["importance"]).abs().max() < 1e-4
    assert fast["importance"].abs().max() > 1e-2  # heads matter: the comparison can fail


def test_uniform_ablation_follows_each_layers_window(case):
    """Uniform attention spreads over the keys the ablated layer sees: its own window or all earlier keys."""
    from headlens.importance.ablation import Replacement

    _, _, _, model = case
    batches = LMLossTask(TEXTS).batches(model, 2)
    P = batches[0].inputs["input_ids"].shape[1]
    for layer in range(model.cfg.n_layers):
        pattern = Replacement(model, "uniform", batches, layer=layer).value(0)[0, 0]  # [P, S] of the first text
        window = model.blocks[layer].attn.sliding_window or P
        assert (pattern[P - 1] > 0).sum() == min(window, P), layer


def test_gradient_importance_equals_finite_differences(case):
    """Michel et al.'s |dL/dg| per example (float64) against central differences of the gate."""
    _, folder, _, _ = case
    model = headlens.load(folder, dtype="float64")
    task = LMLossTask([topics["assert"][:50], topics["pass"][:30]])
    raw = gradient_importance(model, task, normalize=False).set_index(["layer", "head"])["grad_importance_raw"]
    batch = task.batches(model, 2)[0]
    L, H, eps = model.cfg.n_layers, model.cfg.n_heads, 1e-5

    def loss(gate):
        with torch.no_grad():
            return task.compute(model, model(batch.inputs, head_gate=gate, return_type="hidden"), batch)

    for layer, head in [(0, 1), (2, H - 1)]:
        up, down = torch.ones(L, H, dtype=torch.float64), torch.ones(L, H, dtype=torch.float64)
        up[layer, head], down[layer, head] = 1 + eps, 1 - eps
        numeric = ((loss(up) - loss(down)) / (2 * eps)).abs().mean().item()
        assert raw[(layer, head)] == pytest.approx(numeric, rel=1e-5, abs=1e-9)
        assert numeric > 1e-3


PLAN = {0: [0, 1, 2], 1: [5], 2: [0, 2, 4, 5]}  # layer 0 loses a whole kv group (except MQA)


def test_pruned_model_equals_gating_and_exports(case, tmp_path):
    """prune_heads equals the gated model; the padded export loads in transformers with the pruned
    logits, and headlens reads both export layouts back as the pruned model. OLMo 2 refuses."""
    name, _, hf, model = case
    assert (pruning_refusal(model) is None) == (name != "olmo2")  # what the report checks first
    if name == "olmo2":
        with pytest.raises(headlens.HeadlensError, match="QK-norm normalises the whole"):
            prune_heads(model, PLAN)
        return
    pruned = prune_heads(model, PLAN)
    gate = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    for layer, heads in PLAN.items():
        gate[layer, heads] = 0
    batch = encode(model, TEXTS)
    mask = batch["attention_mask"]
    with torch.no_grad():
        expected = model(batch, head_gate=gate)
        assert _max_error_on_real_tokens(pruned(batch), expected, mask, 1) < TOL
        assert _max_error_on_real_tokens(pruned(batch), model(batch), mask, 1) > 1e-2
    folder = save_hf(pruned, tmp_path / "padded", padded=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert _max_error_on_real_tokens(back(**batch).logits, expected, mask, 1) < TOL
    for layout in ("padded", "sliced"):
        again = headlens.load(folder if layout == "padded" else save_hf(pruned, tmp_path / layout))
        assert again.cfg.kept_heads == pruned.cfg.kept_heads, layout
        with torch.no_grad():
            assert _max_error_on_real_tokens(again(batch), expected, mask, 1) < TOL, layout


def test_export_round_trip(case, tmp_path):
    """An unpruned model written by save_hf loads in transformers as the same model."""
    _, _, hf, model = case
    save_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    assert back.config.to_dict().get("layer_types") == hf.config.to_dict().get("layer_types")
    batch = encode(model, TEXTS)
    with torch.no_grad():
        assert _max_error_on_real_tokens(back(**batch).logits, hf(**batch).logits, batch["attention_mask"], 1) < TOL


@pytest.mark.parametrize("config, message", [
    (transformers.Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional attention"),
    (transformers.Phi3Config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 48,
                                              "long_factor": [2.0] * 48, "partial_rotary_factor": 1.0},
                             original_max_position_embeddings=2048), "rope_type 'longrope'"),
    (transformers.Qwen2Config(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2),
     r"layer_types \['linear_attention'\]"),
])
def test_unsupported_configurations_are_refused(config, message):
    from headlens.io.families import family_for_model_type

    with pytest.raises(headlens.HeadlensError, match=message):
        family_for_model_type(config.model_type).config_from_hf(config)


def test_families_are_listed():
    from headlens.cli.models import families_table

    table = families_table().set_index("family")
    for family in ("gemma2", "gemma3_text", "qwen3", "olmo2", "phi3"):
        assert table.loc[family, "exportable"] and table.loc[family, "description"]
    assert "no physical pruning" in table.loc["olmo2", "description"]

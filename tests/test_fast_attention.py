"""Fast attention where nothing looks: a layer whose scores, pattern and per-head values nothing
reads runs torch's ``scaled_dot_product_attention``, every other layer the explicit per-head path.

Same numbers (float32, 1e-4) as the explicit path (``set_attn_implementation("eager")``) on every
family the family tests build, GPT-2, BERT / MiniLM and SmolLM2: padded batches (right and left),
sliding windows, grouped-query attention, QK-norms, soft-caps (explicit there), rotary variants and
a continuation from a KV cache. A layer with a hook, a gate, ``use_attn_result`` or a pattern
capture runs the explicit path (and only that layer); a hook-free forward at a length where a
pattern would be large allocates no tensor of a pattern's size.
"""
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from test_families import CASES as CASES_A
from test_families import hf_config as hf_config_a
from test_families_recent import CASES as CASES_B
from test_families_recent import hf_config as hf_config_b
from test_smollm2 import needs_gguf
from torch.utils._python_dispatch import TorchDispatchMode

import headlens
from headlens.errors import HeadlensError
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.model.attention import needs_explicit
from headlens.model.kv_cache import KVCache
from headlens.model.tokens import encode

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
TEXTS = [topics["assert"][:70], topics["pass"][:40]]  # two lengths: padding in the batch


class Ops(TorchDispatchMode):
    """Records every aten op run under it: ``names`` in order, ``largest`` the most elements of any
    output tensor."""

    def __init__(self):
        super().__init__()
        self.names, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.largest = max([self.largest] + [o.numel() for o in outs if isinstance(o, torch.Tensor)])
        return out

    @property
    def n_sdpa(self) -> int:
        return sum("scaled_dot_product" in name for name in self.names)


def _randomised(config):
    """A transformers model of ``config`` with every parameter redrawn wide (std 0.3; norm weights
    1 +- 0.3), as the family tests do."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = 0.3 * torch.randn_like(p)
            p.copy_(1 + noise if p.ndim == 1 and name.endswith("weight") else noise)
    return hf


def _family(name, tok):
    special = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    make = hf_config_a if name in CASES_A else hf_config_b
    return headlens.from_hf_model(_randomised(make(name, tok.vocab_size + 6, special)), tok)


@pytest.fixture(scope="module")
def families(bert_tokenizer):
    return {name: _family(name, bert_tokenizer) for name in CASES_A + CASES_B}


def _eager(model, *args, **kwargs):
    model.set_attn_implementation("eager")
    try:
        return model(*args, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")


def _fast(model, *args, **kwargs):
    """``model(...)`` and the number of sdpa calls it made."""
    with Ops() as ops:
        out = model(*args, **kwargs)
    return out, ops.n_sdpa


def _fast_layers(model) -> int:
    """Layers that can run sdpa at all (Gemma 2's soft-capped scores cannot)."""
    return sum(not model.blocks[layer].attn.soft_cap for layer in range(model.cfg.n_layers))


def _check_equal(model, batch, **kwargs):
    with torch.no_grad():
        fast, n = _fast(model, batch, **kwargs)
        eager = _eager(model, batch, **kwargs)
    assert n == _fast_layers(model)
    assert (fast - eager).abs().max().item() < TOL


@pytest.mark.parametrize("name", CASES_A + CASES_B)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_families_equal_the_explicit_path(families, name, padding_side):
    model = families[name]
    batch = encode(model, TEXTS, padding_side=padding_side)
    assert not batch["attention_mask"].bool().all()
    _check_equal(model, batch)


@pytest.mark.parametrize("name", CASES_A + CASES_B)
def test_continuation_from_a_kv_cache_equals_the_explicit_path(families, name):
    model = families[name]
    ids = encode(model, TEXTS[:1])["input_ids"][:, :24]
    outs = []
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        try:
            cache = KVCache(model.cfg.n_layers)
            with torch.no_grad():
                model(ids[:, :15], past_kv=cache)
                outs.append(model(ids[:, 15:], past_kv=cache))
        finally:
            model.set_attn_implementation("sdpa")
    assert (outs[0] - outs[1]).abs().max().item() < TOL


def test_unpadded_decoder_uses_is_causal_and_equals_the_explicit_path(families):
    model = families["llama"]
    ids = encode(model, TEXTS[:1])["input_ids"]
    _check_equal(model, ids)
    _check_equal(model, ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is no mask


def test_gpt2_and_bert_equal_the_explicit_path(tiny_gpt2, make_tiny_bert, minilm):
    for model in (tiny_gpt2, make_tiny_bert(0), minilm):
        _check_equal(model, encode(model, TEXTS))


@pytest.mark.slow
@needs_gguf
def test_smollm2_equals_the_explicit_path():
    model = headlens.load("smollm2")
    _check_equal(model, encode(model, [topics["assert"][:300], topics["pass"][:100]]))


# --- who runs the explicit path ----------------------------------------------------------------
@pytest.mark.parametrize("hook", ["hook_q", "hook_rot_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z",
                                  "hook_result"])
def test_a_hooked_layer_runs_explicitly_and_the_others_fast(families, hook):
    model = families["llama"]
    batch = encode(model, TEXTS)
    seen = []
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.1.attn.{hook}", lambda t, hook: seen.append(t.clone()))]):
        fast, n = _fast(model, batch)
    assert n == model.cfg.n_layers - 1 and len(seen) == 1
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager, cache = model.run_with_cache(batch, names_filter=f"blocks.1.attn.{hook}")
    finally:
        model.set_attn_implementation("sdpa")
    assert (seen[0] - cache[f"blocks.1.attn.{hook}"]).abs().max().item() < TOL
    assert (fast - eager).abs().max().item() < TOL


def test_gates_use_attn_result_torch_hooks_and_capture_run_explicitly(families):
    model = families["qwen3"]
    batch = encode(model, TEXTS)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        gated, n = _fast(model, batch, head_gate=torch.ones(L, H))
        assert n == 0 and (gated - _eager(model, batch)).abs().max().item() < TOL
        model.set_use_attn_result(True)
        try:
            assert _fast(model, batch)[1] == 0
        finally:
            model.set_use_attn_result(False)
        handle = model.blocks[2].attn.hook_pattern.register_forward_hook(lambda *a: None)  # torch's own hook
        try:
            assert _fast(model, batch)[1] == L - 1
        finally:
            handle.remove()
        _, cache = model.run_with_cache(batch)
        assert _fast(model, batch)[1] == L  # no hook stays behind
    assert all(needs_explicit(model.blocks[layer].attn, None) is False for layer in range(L))


def test_a_backward_hook_sees_the_explicit_pattern(families):
    model = families["mistral"]
    batch = encode(model, TEXTS)
    grads = []
    model.add_hook("blocks.0.attn.hook_pattern", lambda g, hook: grads.append(g), dir="bwd")
    try:
        with torch.enable_grad():
            model(batch, return_type="loss").backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    assert len(grads) == 1 and grads[0].shape[-2:] == (batch["input_ids"].shape[1],) * 2


def test_the_fast_sweep_runs_its_downstream_layers_fast(families):
    model = families["llama"]
    task = LMLossTask(TEXTS)
    with Ops() as ops:
        fast = ablation_sweep(model, task, "zero", method="fast", n_bootstrap=0, progress=False)
    assert ops.n_sdpa > 0
    naive = ablation_sweep(model, task, "zero", method="naive", n_bootstrap=0, progress=False)
    assert (fast["importance"] - naive["importance"]).abs().max() < TOL


def test_attn_implementation_is_checked(families):
    with pytest.raises(HeadlensError, match="'sdpa' or 'eager'"):
        families["llama"].set_attn_implementation("flash")


# --- memory -------------------------------------------------------------------------------------
def test_a_long_hook_free_forward_allocates_no_pattern():
    """At 2048 tokens a layer's pattern is [1, 4, 2048, 2048] (16.8M elements): the hook-free forward
    allocates nothing of even one head's [P, S] (no mask either); padding builds one [B, 1, P, S]
    mask; a hooked layer's pattern shows up, so the check can fail."""
    P = 2048
    cfg = headlens.ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, n_ctx=P, vocab_size=50,
                               d_mlp=32, positional="rotary", norm="rmsnorm", mlp="swiglu", family="llama")
    model = headlens.HeadlensModel(cfg).init_weights(seed=0).eval()
    ids = torch.randint(0, 50, (1, P), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with Ops() as plain:
            model(ids)
        padded_mask = torch.ones_like(ids)
        padded_mask[:, -10:] = 0
        with Ops() as padded:
            model(ids, attention_mask=padded_mask)
        with Ops() as hooked, model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: None)]):
            model(ids)
    assert plain.n_sdpa == 2 and plain.largest < P * P
    assert padded.n_sdpa == 2 and P * P <= padded.largest < 4 * P * P
    assert hooked.n_sdpa == 1 and hooked.largest >= 4 * P * P

"""Physically pruned models compute exactly what the gated full model computes, are smaller, and
save and load as transformers-layout folders."""
import pytest
import torch

import headlens
from headlens import HeadlensModel, ModelConfig
from headlens.errors import HeadlensError
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import load_task
from headlens.model.heads import gate_without
from headlens.pruning.physical import measure_speedup, parameter_count, prune_heads


@pytest.fixture(scope="module")
def bert(make_tiny_bert):
    return make_tiny_bert(seed=2, initializer_range=0.3)


@pytest.fixture(scope="module")
def gqa():
    """LLaMA-shaped: RMSNorm, rotary, SwiGLU, 4 query heads sharing 2 key/value heads."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, n_ctx=32, vocab_size=60,
                      d_mlp=64, norm="rmsnorm", positional="rotary", mlp="swiglu", qkv_bias=False,
                      out_bias=False, mlp_bias=False, family="llama")
    return HeadlensModel(cfg).init_weights(seed=0, std=0.3).eval()


def inputs(model):
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask}


def check_equals_gate(model, plan):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_heads(model, plan)
    batch = inputs(model)
    with torch.no_grad():
        ours = pruned(batch)
        gated = model(batch, head_gate=gate_without(model, [(l, h) for l, hs in plan.items() for h in hs]))
        full = model(batch)
    real = batch["attention_mask"].bool()
    assert (ours - gated)[real].abs().max() < 1e-5 * max(1.0, float(gated.abs().max()))  # float32 round-off
    assert (ours - full)[real].abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert not {p.data_ptr() for p in pruned.parameters()} & {p.data_ptr() for p in model.parameters()}
    assert parameter_count(pruned) < parameter_count(model)
    return pruned


def test_gpt2_prune_equals_gate_and_empty_layer(tiny_gpt2):
    pruned = check_equals_gate(tiny_gpt2, {0: [1], 2: [0, 1, 2, 3]})
    assert pruned.cfg.kept_heads == [[0, 2, 3], [0, 1, 2, 3], []]
    assert pruned.blocks[2].attn.W_Q.shape[1] == 0
    D, d = tiny_gpt2.cfg.d_model, tiny_gpt2.cfg.d_head
    assert parameter_count(tiny_gpt2) - parameter_count(pruned) == 5 * (4 * D * d + 3 * d)
    assert pruned.head_labels() == [(0, 0), (0, 2), (0, 3)] + [(1, h) for h in range(4)]


def test_bert_prune_equals_gate(bert):
    check_equals_gate(bert, {0: [0, 3], 1: [2]})


def test_gqa_keeps_a_kv_head_while_a_query_head_reads_it(gqa):
    pruned = check_equals_gate(gqa, {0: [0], 1: [2, 3]})
    assert pruned.blocks[0].attn.n_kv_heads == 2  # head 1 still reads kv head 0
    assert pruned.blocks[1].attn.n_kv_heads == 1 and pruned.blocks[1].attn.kv_ids == [0]
    again = check_equals_gate(pruned, {0: [1]})  # pruning a pruned model, by original ids
    assert again.blocks[0].attn.kv_ids == [1] and again.cfg.kept_heads == [[2, 3], [0, 1]]


def test_sweeps_run_on_pruned_models(tiny_gpt2):
    pruned = prune_heads(tiny_gpt2, {1: [0, 2]})
    task = load_task("ioi", pruned, n_examples=4)
    table = ablation_sweep(pruned, task, "mean", n_bootstrap=0, progress=False)
    assert list(zip(table["layer"], table["head"])) == pruned.head_labels()
    naive = ablation_sweep(pruned, task, "mean", method="naive", n_bootstrap=0, progress=False)
    assert (table["importance"] - naive["importance"]).abs().max() < 1e-5


def test_save_and_load(tmp_path, tiny_gpt2, bert):
    from headlens.io.native import load_model, save_model
    from headlens.io.to_hf import save_hf

    for model, plan in ((tiny_gpt2, {0: [1, 3], 2: [0, 1, 2, 3]}), (bert, {1: [0]})):
        pruned = prune_heads(model, plan)
        batch = inputs(model)
        with torch.no_grad():
            expect = pruned(batch)
        for folder, save, load in ((tmp_path / f"hf-{model.cfg.family}", save_hf, headlens.load),
                                   (tmp_path / f"hl-{model.cfg.family}", save_model, load_model)):
            save(pruned, folder)
            back = load(folder)
            assert back.cfg.kept_heads == pruned.cfg.kept_heads
            with torch.no_grad():
                assert (back(batch) - expect).abs().max() < 1e-5


def test_measure_speedup(tiny_gpt2):
    pruned = prune_heads(tiny_gpt2, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    s = measure_speedup(tiny_gpt2, pruned, inputs(tiny_gpt2), repeats=3, warmup=1)
    assert s["heads_full"] == 12 and s["heads_pruned"] == 5 and s["params_pruned"] < s["params_full"]
    assert s["time_full_ms"] > 0 and s["time_pruned_ms"] > 0 and s["speedup"] > 0


def test_bad_plans(tiny_gpt2):
    with pytest.raises(HeadlensError, match="out of range"):
        prune_heads(tiny_gpt2, {0: [4]})
    with pytest.raises(HeadlensError, match="out of range"):
        prune_heads(tiny_gpt2, {"7": [0]})
    pruned = prune_heads(tiny_gpt2, {0: [1]})
    with pytest.raises(HeadlensError, match="head 1 is out of range"):
        prune_heads(pruned, {0: [1]})
    with pytest.raises(HeadlensError, match="plan must be a dict"):
        prune_heads(tiny_gpt2, [(0, 1)])
    same = prune_heads(tiny_gpt2, {})
    assert same.cfg.kept_heads is None and parameter_count(same) == parameter_count(tiny_gpt2)

"""Ablation: the fast sweep equals the naive loop, zero ablation equals TransformerLens' hook_z
zeroing, the model is never left altered, checkpoints resume exactly, bad input is named."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

import headlens
from headlens.errors import HeadlensError
from headlens.importance.ablation import ABLATIONS, ablate, ablation_effect, derangement
from headlens.importance.sweep import ablation_sweep, sweep_metrics
from headlens.importance.tasks import CallableTask, LMLossTask, load_task
from headlens.model.heads import gate_without, resolve_heads

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "it rains", "we walked to the old bridge and back", "one two three"]


@pytest.fixture(scope="module")
def gpt2_pair(bert_tokenizer):
    """A random GPT-2 (2 layers x 4 heads) with large weights, so every head matters, in headlens
    and as a TransformerBridge over the same transformers weights."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=bert_tokenizer.vocab_size,
                     initializer_range=0.3, bos_token_id=bert_tokenizer.cls_token_id,
                     eos_token_id=bert_tokenizer.sep_token_id, attn_implementation="eager")
    hf = GPT2LMHeadModel(cfg).eval()
    model = headlens.from_hf_model(hf, bert_tokenizer)  # before the bridge wraps hf's modules
    # the bridge adds a pad token to its tokenizer: give it a copy, not the shared one
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=copy.deepcopy(bert_tokenizer))
    return model, bridge


@pytest.fixture(scope="module")
def gpt2(gpt2_pair):
    return gpt2_pair[0]


@pytest.fixture(scope="module")
def bert(make_tiny_bert):
    """A random BERT encoder (2 layers x 4 heads) without an output head: padding matters."""
    return make_tiny_bert(seed=1, initializer_range=0.3)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for hp in model.hook_dict.values():
        assert not hp.fwd_hooks and not hp.bwd_hooks and not hp._forward_hooks and not hp._backward_hooks
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("kind", ABLATIONS)
def test_fast_sweep_equals_naive_loop_decoder(gpt2, kind):
    task = LMLossTask(TEXTS)
    before = snapshot(gpt2)
    fast = ablation_sweep(gpt2, task, kind, batch_size=4, n_bootstrap=50, progress=False, memory_budget_mb=0.05)
    naive = ablation_sweep(gpt2, task, kind, method="naive", batch_size=4, n_bootstrap=50, progress=False)
    assert list(fast[["layer", "head"]].itertuples(index=False, name=None)) == gpt2.head_labels()
    assert np.abs(fast["importance"] - naive["importance"]).max() < 1e-5
    assert fast["importance"].abs().median() > 1e-3  # heads matter: the comparison can fail
    assert_untouched(gpt2, before)


@pytest.mark.parametrize("kind", ABLATIONS)
def test_fast_sweep_equals_naive_loop_encoder_with_padding(bert, kind):
    task = load_task("paraphrase", bert, n_examples=6)
    assert (task.batches(bert, 4)[0].inputs["attention_mask"] == 0).any()
    fast = ablation_sweep(bert, task, kind, batch_size=4, n_bootstrap=0, progress=False)
    naive = ablation_sweep(bert, task, kind, method="naive", batch_size=4, n_bootstrap=0, progress=False)
    assert np.abs(fast["importance"] - naive["importance"]).max() < 1e-5
    assert fast["importance"].abs().max() > 1e-3


def test_zero_ablation_equals_transformer_lens_hook_z(gpt2_pair):
    model, bridge = gpt2_pair
    task = LMLossTask(TEXTS[:4])
    batch = task.batches(model, 4)[0]
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    sweep = ablation_sweep(model, task, "zero", n_bootstrap=0, progress=False)
    for layer, head in [(0, 1), (1, 3)]:
        def zero_head(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z

        with torch.no_grad():
            logits = bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        theirs = ((loss * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)).numpy()
        ours = ablate(model, task, (layer, head))
        gated = task.evaluate(model, head_gate=gate_without(model, [(layer, head)]))
        assert np.abs(ours - theirs).max() < 1e-4 and np.abs(ours - gated).max() < 1e-5
        row = sweep[(sweep["layer"] == layer) & (sweep["head"] == head)].iloc[0]
        assert abs(row.importance - (theirs - task.evaluate(model)).mean()) < 1e-4


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_mean_and_resample_ablation_equal_transformer_lens_hook_z(gpt2_pair, ablation):
    """An independent check of the replacement values: on the bridge, plain TransformerLens hooks on
    ``hook_z`` put in each head's dataset mean over real tokens per position (``mean``), or the
    ``z`` of donor row ``derangement(N, seed)[i]`` at the same positions (``resample``; past a
    shorter donor's end, its padding positions' z), and the loss is computed here."""
    model, bridge = gpt2_pair
    task = LMLossTask(TEXTS)
    batch = task.batches(model, len(TEXTS))[0]
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    heads, clean, ablated = sweep_metrics(model, task, ablation, batch_size=2, seed=3, progress=False)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(2)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
    perm = derangement(len(TEXTS), 3)
    m = mask[:, :, None, None].float()
    for layer, head in [(0, 2), (1, 1)]:
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [B, P, H, d]
        if ablation == "mean":
            value = ((z * m).sum(0) / m.sum(0))[None, :, head]  # [1, P, d]
        else:
            value = z[perm][:, :, head]

        def patch(z, hook, value=value):
            z = z.clone()
            z[:, :, head] = value
            return z

        with torch.no_grad():
            logits = bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        theirs = ((loss * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)).numpy()
        assert np.abs(ablated[(layer, head)] - theirs).max() < 1e-4, (ablation, layer, head)
        assert np.abs(ablated[(layer, head)] - clean).max() > 1e-3  # the replacement changed something


def test_groups_layers_and_effects(gpt2):
    task = LMLossTask(TEXTS)
    layer = ablate(gpt2, task, {1: None})
    gated = task.evaluate(gpt2, head_gate=gate_without(gpt2, [(1, h) for h in range(4)]))
    assert np.abs(layer - gated).max() < 1e-5
    effect = ablation_effect(gpt2, task, [(0, 0), (1, 2)], n_bootstrap=200)
    assert effect["importance_ci_low"] <= effect["importance"] <= effect["importance_ci_high"]
    assert effect["n_examples"] == len(TEXTS) and effect["importance_se"] > 0


def test_replacements(gpt2):
    perm = derangement(50, seed=3)
    assert sorted(perm.tolist()) == list(range(50)) and (perm != torch.arange(50)).all()
    assert torch.equal(perm, derangement(50, seed=3)) and not torch.equal(perm, derangement(50, seed=4))
    task = LMLossTask(TEXTS)
    per_pos = ablate(gpt2, task, (0, 2), "mean", per_position=True)
    averaged = ablate(gpt2, task, (0, 2), "mean", per_position=False)
    assert np.abs(per_pos - averaged).max() > 1e-4
    mask = task.batches(gpt2, 16)[0].inputs["attention_mask"]

    def uniform_head_1(pattern, hook):  # an independent implementation: causal and padding mask
        P = pattern.shape[-1]
        visible = torch.tril(torch.ones(P, P)) * mask[:, None, :]
        pattern = pattern.clone()
        pattern[:, 1] = visible / visible.sum(-1, keepdim=True)
        return pattern

    expect = task.evaluate(gpt2, fwd_hooks=[("blocks.1.attn.hook_pattern", uniform_head_1)])
    assert np.abs(ablate(gpt2, task, (1, 1), "uniform") - expect).max() < 1e-5
    assert np.abs(expect - task.evaluate(gpt2)).max() > 1e-3


def test_bootstrap_and_table(gpt2):
    task = LMLossTask(TEXTS)
    a = ablation_sweep(gpt2, task, n_bootstrap=300, seed=5, progress=False)
    b = ablation_sweep(gpt2, task, n_bootstrap=300, seed=5, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns[:2]) == ["layer", "head"]
    assert ((a.importance_ci_low <= a.importance) & (a.importance <= a.importance_ci_high)).all()
    assert np.allclose(a.damage, a.importance)  # a loss: damage = importance
    assert (a.n_examples == len(TEXTS)).all() and np.allclose(a.metric_ablated - a.metric_clean, a.importance)


def test_model_untouched_when_analysis_fails(gpt2):
    before = snapshot(gpt2)
    calls = {"n": 0}

    def flaky(logits, inputs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("metric failed midway")
        return logits[:, -1, 0]

    for method in ("fast", "naive"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="midway"):
            ablation_sweep(gpt2, CallableTask(TEXTS, flaky), "resample", method=method, batch_size=2, progress=False)
        assert_untouched(gpt2, before)
    with pytest.raises(HeadlensError, match="out of range"):
        ablation_sweep(gpt2, LMLossTask(TEXTS), heads=[(0, 1), (1, 7)], progress=False)
    with pytest.raises(HeadlensError, match="out of range"):
        ablate(gpt2, LMLossTask(TEXTS), [(5, 0)])
    assert_untouched(gpt2, before)


def test_checkpoint_resume_recomputes_nothing_finished(gpt2, tmp_path):
    task = LMLossTask(TEXTS)
    full = ablation_sweep(gpt2, task, "mean", batch_size=4, n_bootstrap=100, progress=False, memory_budget_mb=0.05)
    calls = {"n": 0, "stop": None}
    original = LMLossTask.score

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] > calls["stop"]:
            raise KeyboardInterrupt  # killed mid-sweep
        return original(self, *args, **kwargs)

    LMLossTask.score = counting
    try:
        calls["stop"] = 10
        with pytest.raises(KeyboardInterrupt):
            ablation_sweep(gpt2, task, "mean", batch_size=4, n_bootstrap=100, progress=False,
                           memory_budget_mb=0.05, resume_dir=tmp_path)
        done = len(list(tmp_path.glob("layer*.json")))
        assert 0 < done < 8 and not list(tmp_path.glob("*.tmp"))
        calls.update(n=0, stop=None)
        resumed = ablation_sweep(gpt2, task, "mean", batch_size=4, n_bootstrap=100, progress=False,
                                 memory_budget_mb=0.05, resume_dir=tmp_path)
        n_resumed = calls["n"]
        calls["n"] = 0
        again = ablation_sweep(gpt2, task, "mean", batch_size=4, n_bootstrap=100, progress=False,
                               memory_budget_mb=0.05, resume_dir=tmp_path)
    finally:
        LMLossTask.score = original
    pd.testing.assert_frame_equal(resumed, full)
    pd.testing.assert_frame_equal(again, full)
    n_batches = 2
    assert calls["n"] == n_batches  # the finished sweep recomputes only the clean metric
    assert n_resumed == n_batches + (8 - done) * n_batches
    with pytest.raises(HeadlensError, match="different sweep"):
        ablation_sweep(gpt2, task, "zero", progress=False, resume_dir=tmp_path)
    from headlens.storage.folders import FolderLock

    with FolderLock(tmp_path):  # another job writing the same resume folder (the interrupted one let it go)
        with pytest.raises(HeadlensError, match="resume_dir .* is in use by another headlens run"):
            ablation_sweep(gpt2, task, "mean", batch_size=4, n_bootstrap=100, progress=False,
                           memory_budget_mb=0.05, resume_dir=tmp_path)


def test_bad_input(gpt2):
    task = LMLossTask(TEXTS)
    with pytest.raises(HeadlensError, match="ablation must be one of"):
        ablation_sweep(gpt2, task, "shuffle", progress=False)
    with pytest.raises(HeadlensError, match="method"):
        ablation_sweep(gpt2, task, method="slow", progress=False)
    with pytest.raises(HeadlensError, match="head 9 is out of range"):
        resolve_heads(gpt2, (0, 9))
    with pytest.raises(HeadlensError, match="layer 3 is out of range"):
        resolve_heads(gpt2, {3: [0]})
    with pytest.raises(HeadlensError, match="empty"):
        ablation_sweep(gpt2, LMLossTask([]), progress=False)
    with pytest.raises(HeadlensError, match="NaN"):
        ablation_sweep(gpt2, CallableTask(TEXTS, lambda o, i: o[:, 0, 0] * float("nan")), progress=False)


def test_importance_command(gpt2, tmp_path, capsys):
    from headlens.cli import main
    from headlens.io.native import save_model

    save_model(gpt2, tmp_path / "model")
    out = tmp_path / "imp.csv"
    assert main(["importance", "--model", str(tmp_path / "model"), "--task", "ioi", "--n-examples", "8",
                 "--n-bootstrap", "20", "--attribution", "corrupted", "--no-progress", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 8 and {"importance", "grad_importance", "attribution"} <= set(table.columns)
    assert "Spearman" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_sweep_of_a_task_that_compares_with_the_unablated_model(gpt2, method):
    """Fidelity (KL to the unablated model): the clean metric is 0 and each head's importance is
    what ablate() measures with its own reference."""
    from headlens.importance.tasks import FidelityTask

    task = FidelityTask(TEXTS, measure="kl")
    table = ablation_sweep(gpt2, task, "zero", method=method, batch_size=4, n_bootstrap=0, progress=False)
    assert table["metric_clean"].abs().max() < 1e-6
    for layer, head in [(0, 1), (1, 3)]:
        row = table[(table["layer"] == layer) & (table["head"] == head)]
        assert row["importance"].item() == pytest.approx(ablate(gpt2, task, (layer, head)).mean(), abs=1e-6)
    assert table["importance"].min() > 0 and table["importance"].max() > 1e-3

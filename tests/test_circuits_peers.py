"""headlens.circuits against TransformerLens on the same weights, float32, tolerance 1e-4:
activation patching (``transformer_lens.patching``), path patching (``get_act_patch_direct_path``),
composition and copying scores (``all_composition_scores``, ``FactoredMatrix.eigenvalues``), direct
logit attribution (``stack_head_results(apply_ln=True)``), EAP edge scores and exact circuit
faithfulness (``tools.analysis.attribution_patching``), on a random GPT-2 (LayerNorm, multi-head) and a
random LLaMA (RMSNorm, rotary, grouped-query attention: 6 query heads over 2 key/value heads).

Every comparison also checks that the quantity varies (patches change the metric, scores differ
between heads), so that agreement is not agreement on a constant.
"""
import copy

import numpy as np
import pytest
import torch
import transformers
from transformer_lens import patching as tl_patching
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis import attribution_patching as tl_ap

import headlens
from headlens.circuits.dla import LogitAttribution
from headlens.circuits.edges import EdgeAttribution
from headlens.circuits.faithfulness import circuit_metrics
from headlens.circuits.graph import EdgeGraph
from headlens.circuits.patching import patching_metrics
from headlens.circuits.paths import path_patching_metrics
from headlens.circuits.weights import composition_scores, copying_scores
from headlens.importance.tasks import ContrastTask

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
N, P = 3, 6


def _randomize(hf):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if p.ndim == 1 and name.endswith("weight") else noise)
    return hf.eval()


CONFIGS = {
    "gpt2": lambda V: transformers.GPT2Config(n_layer=2, n_head=3, n_embd=24, n_positions=32, vocab_size=V),
    "llama": lambda V: transformers.LlamaConfig(vocab_size=V, hidden_size=36, intermediate_size=44,
                                                num_hidden_layers=2, max_position_embeddings=32,
                                                num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                                attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, bert_tokenizer):
    """``(name, headlens model, bridge, bridge in compatibility mode)`` on the same random weights."""
    config = CONFIGS[request.param](bert_tokenizer.vocab_size)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = _randomize(transformers.AutoModelForCausalLM.from_config(config))
    ours = headlens.load(hf, tokenizer=bert_tokenizer)

    def boot():
        return TransformerBridge.boot_transformers(type(hf).__name__, hf_model=copy.deepcopy(hf),
                                                   tokenizer=copy.deepcopy(bert_tokenizer)).eval()
    compat = boot()
    # TransformerLens' default folds each head's value bias into b_O; headlens keeps it with its head
    compat.enable_compatibility_mode(disable_warnings=True, fold_value_biases=False)
    return request.param, ours, boot(), compat


@pytest.fixture(scope="module")
def data():
    """Token ids ``[N, P]``, corrupted at position 2, with a right and a wrong answer per example."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (N, P), generator=gen)
    corr = ids.clone()
    corr[:, 2] = torch.randint(1000, 2000, (N,), generator=gen)
    right, wrong = torch.randint(1000, 2000, (N,), generator=gen), torch.randint(1000, 2000, (N,), generator=gen)
    task = ContrastTask(ids.tolist(), right.tolist(), wrong.tolist(), corrupted=corr.tolist())
    return ids, corr, right, wrong, task


def _logit_diff(right, wrong):
    """Per example: logit of ``right`` minus logit of ``wrong`` at the last position (``[batch]``)."""
    def metric(logits):
        last, rows = logits[:, -1], torch.arange(logits.shape[0])
        return last[rows, right] - last[rows, wrong]
    return metric


def test_activation_patching_equals_transformer_lens(pair, data):
    name, ours, bridge, _ = pair
    ids, corr, right, wrong, task = data
    _, cache = bridge.run_with_cache(ids)
    metric = _logit_diff(right, wrong)
    every = {"z": tl_patching.get_act_patch_attn_head_out_all_pos, "q": tl_patching.get_act_patch_attn_head_q_all_pos,
             "k": tl_patching.get_act_patch_attn_head_k_all_pos, "v": tl_patching.get_act_patch_attn_head_v_all_pos,
             "pattern": tl_patching.get_act_patch_attn_head_pattern_all_pos}
    keys, patched, _, corrupted = patching_metrics(ours, task, list(every), progress=False)
    for act, fn in every.items():
        ref = fn(bridge, corr, cache, metric, reduce="none").values  # [L, heads, N]
        mine = [k for k in keys if k[2] == act]
        assert len(mine) == ref.shape[0] * ref.shape[1]  # key/value heads for k and v
        assert max(np.abs(patched[k] - ref[k[0], k[1]].numpy()).max() for k in mine) < TOL, act
        assert max(np.abs(patched[k] - corrupted).max() for k in mine) > 0.05, f"patching {act} changes nothing"
    # per position: keys (by key/value head under GQA) on LLaMA, the pattern per query position on GPT-2
    act, fn = ("k", tl_patching.get_act_patch_attn_head_k_by_pos) if name == "llama" else \
        ("pattern", tl_patching.get_act_patch_attn_head_pattern_by_pos)
    ref = fn(bridge, corr, cache, metric, reduce="none").values
    keys, patched, _, _ = patching_metrics(ours, task, [act], by_position=True, progress=False)
    for k in keys:
        theirs = ref[k[0], k[3], k[1]] if act == "k" else ref[k[0], k[1], k[3]]  # [L, pos, kv] / [L, head, pos]
        assert np.abs(patched[k] - theirs.numpy()).max() < TOL, k


def test_path_patching_equals_direct_path_patching(pair, data):
    """Denoising path patching is TransformerLens' direct path patching (which refuses k / v under GQA)."""
    name, ours, bridge, _ = pair
    ids, corr, right, wrong, task = data
    _, clean_cache = bridge.run_with_cache(ids)
    _, corr_cache = bridge.run_with_cache(corr)
    keys, patched, _, corrupted = path_patching_metrics(ours, task, direction="denoise", progress=False)
    metric = (lambda logits: _logit_diff(right, wrong)(logits).mean())
    vias = ("q", "k", "v") if name == "gpt2" else ("q",)
    for sl, sh in [(0, h) for h in range(ours.cfg.n_heads)]:
        for via in vias:
            ref = tl_patching.get_act_patch_direct_path(bridge, corr, clean_cache, corr_cache, metric, sl, sh,
                                                        component=via, verbose=False)
            mine = [k for k in keys if k[:2] == (sl, sh) and k[4] == via]
            assert len(mine) == ours.cfg.n_heads
            assert max(abs(patched[k].mean() - float(ref[k[2], k[3]])) for k in mine) < TOL, (sl, sh, via)
    assert max(abs(patched[k].mean() - corrupted.mean()) for k in keys) > 0.05


def test_composition_and_copying_equal_transformer_lens(pair):
    """On TransformerLens' processed weights (norms folded, centred); the processing matters."""
    name, ours, bridge, compat = pair
    table = composition_scores(ours, n_samples=50)
    raw = bridge.all_composition_scores("K").scores
    for via in ("q", "k", "v"):
        ref = compat.all_composition_scores(via.upper()).scores
        sub = table[table.via == via]
        assert len(sub) == ours.cfg.n_heads ** 2
        theirs = np.array([float(ref[r.sender_layer, r.sender_head, r.receiver_layer, r.receiver_head])
                           for r in sub.itertuples()])
        assert np.abs(sub.score.to_numpy() - theirs).max() < TOL, via
        assert np.ptp(theirs) > 0.01
    k = table[table.via == "k"]
    unprocessed = np.array([float(raw[r.sender_layer, r.sender_head, r.receiver_layer, r.receiver_head])
                            for r in k.itertuples()])
    assert np.abs(k.score.to_numpy() - unprocessed).max() > 1e-3, "norm folding made no difference"
    copying = copying_scores(ours)
    for r in copying.itertuples():
        evals = (compat.W_E @ compat.OV[r.layer, r.head] @ compat.W_U).eigenvalues
        assert abs(float(evals.sum().real / evals.abs().sum()) - r.copying_score) < TOL
        assert abs(float((evals.real > 0).double().mean()) - r.positive_fraction) < TOL
    assert copying.copying_score.std() > 0.01


def test_logit_attribution_equals_transformer_lens_and_reconstructs(pair, data):
    name, ours, _, compat = pair
    ids, _, right, wrong, task = data
    dla = LogitAttribution(n_bootstrap=0).fit(ours, task)
    _, cache = compat.run_with_cache(ids)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [heads, N, D]
    direction = compat.tokens_to_residual_directions(right) - compat.tokens_to_residual_directions(wrong)
    theirs = (stack * direction).sum(-1).detach().numpy()
    assert np.abs(dla.per_example_ - theirs).max() < TOL
    assert np.abs(theirs).max() > 0.05
    assert dla.reconstruction_error_ < TOL
    by_key = dla.positions_.groupby(["layer", "head"]).attribution.apply(
        lambda a: a.sum()).to_numpy()  # one example length: offsets cover every key position
    assert np.abs(by_key - dla.heads_.attribution.to_numpy()).max() < TOL


def test_edge_scores_and_faithfulness_equal_transformer_lens(pair, data):
    """TransformerLens scores edges per position on multi-head attention only: summed over positions
    its EAP (denoising, gradient at the corrupted run) is headlens' EAP, and its exact
    faithfulness of a circuit is headlens' on each example."""
    name, ours, bridge, _ = pair
    if name != "gpt2":
        pytest.skip("TransformerLens' edge attribution refuses grouped-query attention (checked on GPT-2)")
    ids, corr, right, wrong, task = data
    graph = EdgeGraph.of(ours)
    eap = EdgeAttribution("eap", direction="denoise").fit(ours, task)
    ours_scores = {(s, r): v for s, r, v in zip(eap.edges_.sender, eap.edges_.receiver, eap.edges_.score)}

    def label(node):
        if node.kind == "embed":
            return "input"
        if node.kind in ("attn_head_out", "mlp_out"):
            return f"{node.layer}.{node.head}" if node.kind == "attn_head_out" else f"mlp{node.layer}"
        names = {"q_input": f"{node.layer}.{node.head}<q>", "k_input": f"{node.layer}.kv{node.head}<k>",
                 "v_input": f"{node.layer}.kv{node.head}<v>", "mlp_in": f"mlp{node.layer}", "logits": "logits"}
        return names[node.kind]

    theirs, tl_edges = {}, []
    for i in range(N):
        metric = (lambda logits, i=i: _logit_diff(right[i:i + 1], wrong[i:i + 1])(logits).sum())
        res = tl_ap.attribution_patch(bridge, ids[i:i + 1], corr[i:i + 1], metric,
                                      tl_ap.EdgeAttributionConfig(granularity="edge"))
        for (w, r), score in res.edge_scores.items():
            theirs[(label(w), label(r))] = theirs.get((label(w), label(r)), 0.0) + score / N
        tl_edges.append(list(res.edge_scores))
    assert set(theirs) == set(ours_scores) and len(theirs) == graph.n_edges
    assert max(abs(ours_scores[k] - v) for k, v in theirs.items()) < TOL
    gen = torch.Generator().manual_seed(0)
    kept = (torch.rand(graph.allowed.shape, generator=gen) < 0.5) & graph.allowed
    names = {(graph.sender_name(s), graph.receiver_name(r)) for s, r in kept.nonzero().tolist()}
    metrics, clean, corrupted = circuit_metrics(ours, task, [kept], graph=graph)
    recovered = []
    for i in range(N):
        metric = (lambda logits, i=i: _logit_diff(right[i:i + 1], wrong[i:i + 1])(logits).sum())
        circuit = [e for e in tl_edges[i] if (label(e[0]), label(e[1])) in names]
        res = tl_ap.faithfulness(bridge, ids[i:i + 1], corr[i:i + 1], metric, circuit)
        ours_i = (metrics[0, i] - corrupted[i]) / (clean[i] - corrupted[i])
        assert abs(res.recovered - ours_i) < 1e-3 and abs(res.full_metric - clean[i]) < TOL
        recovered.append(ours_i)
    assert np.ptp(recovered) > 0.01

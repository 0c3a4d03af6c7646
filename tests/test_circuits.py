"""headlens.circuits on models whose circuits are known, and its own invariants.

- The shipped 2-layer induction toy: without being told which heads to look at, the heads that
  matter are its layer-1 induction heads, and each one's strongest K-composition partner and
  strongest key-side path is the layer-0 previous-token head 0.2, well above the random baseline
  and the runner-up; its extracted EAP-IG circuit holds its faithfulness on held-out examples.
- The 1-layer control: no composition, no head-to-head path, and the findings say so.
- The edge-patching forward is the model (no patch), the corrupted run (every edge patched) and
  activation patching of a head's z (every edge out of that head), on grouped-query attention and
  on a parallel block, where TransformerLens' edge tools do not reach.
- No analysis leaves the model altered, finished or interrupted.
"""
import copy

import numpy as np
import pytest
import torch
import transformers
from test_no_side_effects import Tripwire, assert_untouched, snapshot

import headlens
from headlens.circuits import (
    EdgeAttribution,
    LogitAttribution,
    activation_patching,
    composition_scores,
    extract_circuit,
    induction_task,
    path_patching,
)
from headlens.circuits.faithfulness import circuit_metrics
from headlens.circuits.graph import EdgeGraph, graph_forward
from headlens.circuits.patching import patching_metrics
from headlens.circuits.summary import findings, key_heads, partners, strongest_paths
from headlens.errors import HeadlensError
from headlens.importance.tasks import load_task
from headlens.model.transformer import HeadlensModel

pytestmark = pytest.mark.usefixtures("one_thread")
PREVIOUS_TOKEN_HEAD = (0, 2)  # the toy card's strong previous-token head (0.917 to the previous token)


@pytest.fixture(scope="module")
def toy2():
    model = headlens.load("toy-induction-2l")
    return model, induction_task(model, 24, seed=3)


@pytest.fixture(scope="module")
def toy2_tables(toy2):
    model, task = toy2
    patching = activation_patching(model, task, ("z",), n_bootstrap=200, progress=False)
    return dict(patching=patching, composition=composition_scores(model, n_samples=300),
                paths=path_patching(model, task, vias=("q", "k", "v"), n_bootstrap=200, progress=False))


def test_the_induction_heads_are_found_and_read_the_previous_token_head(toy2, toy2_tables):
    patching, composition, paths = toy2_tables["patching"], toy2_tables["composition"], toy2_tables["paths"]
    heads = key_heads(patching, 8)
    layer1 = [h for h in heads if h[0] == 1]
    assert sorted(layer1) == [(1, 0), (1, 1), (1, 2), (1, 3)], heads
    best = partners(composition, layer1)
    k = best[best.via == "k"]
    assert len(k) == 4
    assert (k.sender_layer == 0).all() and (k.sender_head == 2).all(), k
    assert (k.score > 1.5 * k.baseline_p95).all() and (k.score > k.second + 0.02).all()
    path = strongest_paths(paths, layer1)
    via_k = path[path.via == "k"]
    assert [(r.sender_layer, r.sender_head) for r in via_k.itertuples()] == [PREVIOUS_TOKEN_HEAD] * 4, via_k
    assert (via_k.ci_low > 0).all() and (via_k.effect > 2 * via_k.second).all()
    # key-side paths carry it: the strongest query- or value-side path is far weaker
    assert via_k.effect.min() > 10 * path[path.via != "k"].effect.abs().max()
    text = " ".join(findings(2, dict(name="induction", metric="loss", clean=0.0, corrupted=6.0), patching,
                             composition, paths))
    for receiver in range(4):
        assert f"1.{receiver} <- 0.2" in text and f"0.2 -> 1.{receiver}" in text


def test_the_one_layer_control_has_nothing_to_find():
    model = headlens.load("toy-induction-1l")
    task = induction_task(model, 12, seed=3)
    composition = composition_scores(model, n_samples=50)
    paths = path_patching(model, task, n_bootstrap=100, progress=False)
    assert len(composition) == 0
    assert set(paths.via) == {"logits"} and len(paths) == 4
    text = " ".join(findings(1, dict(name="induction", metric="loss", clean=3.0, corrupted=3.5), None,
                             composition, paths))
    assert "nothing to find between heads" in text and "K-composition partner" not in text


def test_extracted_circuit_keeps_its_faithfulness_when_verified(toy2):
    model, task = toy2
    circuit = extract_circuit(model, task, "eap-ig", steps=3, target=0.8, batch_size=12, n_bootstrap=200,
                              curve_points=6)
    assert circuit.stated["faithfulness"] >= 0.8
    assert circuit.verified["ci_high"] >= 0.75 and circuit.verified["n_examples"] == 12
    k_edges = circuit.edges[circuit.edges.via == "k"]
    assert "0.2" in set(k_edges.sender), circuit.edges
    curve = circuit.curve.set_index("n_edges")
    assert abs(curve.loc[circuit.total_edges, "faithfulness"] - 1) < 1e-6  # every edge kept: the clean run
    assert abs(curve.loc[0, "faithfulness"]) < 1e-6  # no edge kept: the corrupted run
    assert circuit.to_dict()["n_edges"] == circuit.n_edges == len(circuit.edges)


# --- the edge-patching forward ------------------------------------------------------------------
def _random_decoder(config, bert_tokenizer):
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if p.ndim == 1 and name.endswith("weight") else noise)
    return headlens.load(hf, tokenizer=bert_tokenizer)


DECODERS = {
    "llama-gqa": lambda V: transformers.LlamaConfig(vocab_size=V, hidden_size=36, intermediate_size=44,
                                                    num_hidden_layers=2, max_position_embeddings=64,
                                                    num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    "neox-parallel": lambda V: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=24, intermediate_size=40,
                                                          num_hidden_layers=2, max_position_embeddings=64,
                                                          num_attention_heads=3, rotary_pct=0.5),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_edge_patching_is_the_model_the_corrupted_run_and_activation_patching(name, bert_tokenizer):
    model = _random_decoder(DECODERS[name](bert_tokenizer.vocab_size), bert_tokenizer)
    task = load_task("ioi", model, n_examples=3)
    graph = EdgeGraph.of(model)
    if name == "neox-parallel":  # a parallel block's MLP reads the layer input: no edge from its own heads
        assert not graph.allowed[graph.senders.index(("head", 0, 0)), graph.receivers.index(("mlp", 0, -1))]
    batch = task.batches(model)[0]
    with torch.no_grad():
        hidden, _ = graph_forward(model, graph, batch.inputs)
        model.set_attn_implementation("eager")  # the explicit path the graph's hooks run on
        try:
            assert torch.equal(hidden, model(batch.inputs, return_type="hidden"))
        finally:
            model.set_attn_implementation("sdpa")
        assert (hidden - model(batch.inputs, return_type="hidden")).abs().max() < 1e-4
        corrupted, trace = graph_forward(model, graph, batch.corrupted)
        everything, _ = graph_forward(model, graph, batch.inputs, patched=graph.allowed, replacement=trace)
        assert (everything - corrupted).abs().max() < 1e-4  # no edge kept: the sum over kept edges is empty
    head = ("head", 1, 1)
    kept = graph.allowed.clone()
    kept[graph.senders.index(head)] = False  # every edge out of head 1.1 takes its corrupted output
    metrics, clean, corr = circuit_metrics(model, task, [kept], graph=graph)
    keys, patched, _, _ = patching_metrics(model, task, ["z"], direction="noise", heads=[(1, 1)], progress=False)
    assert keys == [(1, 1, "z", -1)]
    assert np.abs(metrics[0] - patched[keys[0]]).max() < 1e-4
    assert np.abs(metrics[0] - clean).max() > 1e-3


def test_bad_input_is_refused(minilm, tiny_gpt2):
    with pytest.raises(HeadlensError, match="post-norm"):
        EdgeGraph.of(minilm)
    with pytest.raises(HeadlensError, match="corrupted"):
        activation_patching(tiny_gpt2, load_task("lm", tiny_gpt2, n_examples=2), progress=False)
    with pytest.raises(HeadlensError, match="contrast task"):
        LogitAttribution().fit(tiny_gpt2, induction_task(tiny_gpt2, 4))
    with pytest.raises(HeadlensError, match="method"):
        EdgeAttribution(method="acdc").fit(tiny_gpt2, load_task("ioi", tiny_gpt2, n_examples=2))
    with pytest.raises(HeadlensError, match="activation"):
        activation_patching(tiny_gpt2, load_task("ioi", tiny_gpt2, n_examples=2), ("resid",))


# --- the model is left as it was ------------------------------------------------------------------
ANALYSES = {
    "logit_attribution": lambda m, t: LogitAttribution(batch_size=2, n_bootstrap=10).fit(m, t),
    "activation_patching": lambda m, t: activation_patching(m, t, ("z", "k", "pattern"), batch_size=2,
                                                            n_bootstrap=10, progress=False),
    "path_patching": lambda m, t: path_patching(m, t, senders=[(0, 0), (1, 1)], batch_size=2, n_bootstrap=10,
                                                progress=False),
    "edge_attribution": lambda m, t: EdgeAttribution(steps=2, batch_size=2).fit(m, t),
    "extract_circuit": lambda m, t: extract_circuit(m, t, "eap", n_edges=10, batch_size=2, n_bootstrap=10,
                                                    curve_points=3),
}


@pytest.fixture(scope="module")
def training_model(tiny_gpt2):
    state = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    return HeadlensModel.from_state_dict(tiny_gpt2.cfg.replace(), state, copy.deepcopy(tiny_gpt2.tokenizer)).train()


@pytest.mark.parametrize("name", list(ANALYSES))
def test_analysis_leaves_the_model_untouched(name, training_model):
    model = training_model
    task = load_task("ioi", model, n_examples=4)
    before = snapshot(model)
    with Tripwire(model) as count:
        ANALYSES[name](model, task)
    assert_untouched(model, before)
    assert count.n >= 2
    for exc in (RuntimeError("failed midway"), KeyboardInterrupt()):
        with Tripwire(model, exc, at=count.n // 2 + 1), pytest.raises(type(exc)):
            ANALYSES[name](model, task)
        assert_untouched(model, before)

"""headlens recovers the heads whose roles are known: on the shipped toy models, the pattern scores,
roles, ablation sweep and clustering must find what the training put there (and what the model
cards measured directly from ``hook_pattern``)."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from headlens.data import MODELS_DIR
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import RepeatedHalfTask
from headlens.io.native import load_model, read_card
from headlens.patterns.clusters import HeadClusterer
from headlens.patterns.roles import assign_roles
from headlens.patterns.scores import pattern_scores, probe_tokens
from headlens.synthetic import cards
from headlens.synthetic import toys as toy

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

MODELS = MODELS_DIR


@pytest.fixture(scope="module")
def two_layer():
    return load_model(MODELS / "toy-induction-2l")


@pytest.fixture(scope="module")
def segments():
    """64 sequences of the induction models' training distribution (fresh seed)."""
    return toy.repeated_segment_tokens(64, 64, 64, torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def two_layer_scores(two_layer, segments):
    return assign_roles(pattern_scores(two_layer, segments, seed=0))


def direct_attention(model, tokens, T) -> pd.DataFrame:
    """The reference the library's scores are checked against, computed here from
    ``hook_pattern`` in a few lines: mean ``A[i, i-1]`` (i >= 1), ``A[i, 0]`` (i >= 1), ``A[i, i]``,
    and ``A[i, i-T+1]`` over the second copy of ``[BOS?, x, x]`` (|x| = T)."""
    P = tokens.shape[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    i = torch.arange(P)
    second = i[P - T:]
    rows = []
    for layer in range(model.cfg.n_layers):
        A = cache[f"blocks.{layer}.attn.hook_pattern"].double().mean(0)  # [H, P, S]
        for h, head in enumerate(model.blocks[layer].attn.head_ids):
            rows.append({"layer": layer, "head": head, "previous_token": A[h, i[1:], i[1:] - 1].mean().item(),
                         "first_token": A[h, i[1:], 0].mean().item(), "self": A[h, i, i].mean().item(),
                         "induction": A[h, second, second - T + 1].mean().item()})
    return pd.DataFrame(rows)


def test_scores_agree_with_the_direct_measurement(two_layer, two_layer_scores, segments):
    tokens, T = toy.eval_tokens(two_layer, half_len=31, n_seqs=64, seed=3)
    ours = pattern_scores(two_layer, tokens, induction=False)
    direct = direct_attention(two_layer, tokens, T)
    card = cards.head_attention(two_layer, tokens, T)  # what the model cards state
    for column in ("previous_token", "first_token", "self"):
        np.testing.assert_allclose(ours[f"score_{column}"], direct[column], atol=1e-5)
        np.testing.assert_allclose(card[column], direct[column], atol=1e-5)
    np.testing.assert_allclose(card["induction"], direct["induction"], atol=1e-5)
    ids, start, T = probe_tokens(two_layer, n_seqs=32, half_len=20, seed=0)
    direct = direct_attention(two_layer, ids, T)
    np.testing.assert_allclose(two_layer_scores["score_induction"], direct["induction"], atol=1e-5)


def test_scores_label_layer_one_induction_and_the_best_layer_zero_head_previous_token(two_layer, two_layer_scores):
    s = two_layer_scores
    layer0, layer1 = s[s.layer == 0], s[s.layer == 1]
    assert (layer1["role"] == "induction").all()
    assert layer1["score_induction"].min() > 0.6
    assert layer0["score_induction"].max() < 0.1 and "induction" not in set(layer0["role"])
    best = layer0.loc[layer0["score_previous_token"].idxmax()]
    assert best["role"] == "previous-token" and best["score_previous_token"] > 0.85
    card = read_card(MODELS / "toy-induction-2l")
    documented = max((h for h in card["heads"] if h["layer"] == 0), key=lambda h: h["previous_token"])
    assert best["head"] == documented["head"]


def test_one_layer_control_has_no_induction_head(segments):
    model = load_model(MODELS / "toy-induction-1l")
    s = assign_roles(pattern_scores(model, segments, seed=0))
    assert "induction" not in set(s["role"])
    assert s["score_induction"].max() < 0.2


def test_first_token_model_has_its_first_token_and_previous_token_heads():
    model = load_model(MODELS / "toy-first-token")
    card = read_card(MODELS / "toy-first-token")
    tokens = torch.randint(0, 64, (32, 64), generator=torch.Generator().manual_seed(5))
    s = assign_roles(pattern_scores(model, tokens, induction=False)).set_index(["layer", "head"])
    [(fl, fh)], [(pl, ph)] = card["roles"]["first-token sink"], card["roles"]["previous-token"]
    assert s.loc[(fl, fh), "role"] == "first-token sink" and s.loc[(fl, fh), "pattern_class"] == "vertical"
    assert s.loc[(pl, ph), "role"] == "previous-token" and s.loc[(pl, ph), "pattern_class"] == "diagonal"


def test_ablating_the_previous_token_head_hurts_more_than_any_induction_head(two_layer, two_layer_scores):
    tokens, T = toy.eval_tokens(two_layer, n_seqs=64, seed=11)
    sweep = ablation_sweep(two_layer, RepeatedHalfTask(tokens, T), ablation="zero", n_bootstrap=200,
                           progress=False).set_index(["layer", "head"])
    s = two_layer_scores
    layer0 = s[s.layer == 0]
    prev = tuple(layer0.loc[layer0["score_previous_token"].idxmax(), ["layer", "head"]])
    induction = [tuple(x) for x in s.loc[s.role == "induction", ["layer", "head"]].to_numpy()]
    assert len(induction) >= 2
    assert sweep.loc[prev, "damage"] > 1.0  # K-composition: the induction heads' keys need it
    assert sweep.loc[prev, "importance_ci_low"] > max(sweep.loc[h, "importance_ci_high"] for h in induction)
    assert max(sweep.loc[h, "damage"] for h in induction) < 0.2  # redundant: each alone is dispensable
    # the reference: each head's output gated to 0 through the model's own head_gate, loss computed here
    for layer, head in two_layer.head_labels():
        gate = torch.ones(two_layer.cfg.n_layers, two_layer.cfg.n_heads)
        gate[layer, head] = 0
        with torch.no_grad():
            logits = two_layer(tokens, head_gate=gate)
        start = tokens.shape[1] - T
        nll = F.cross_entropy(logits[:, start:-1].transpose(1, 2), tokens[:, start + 1:], reduction="none")
        assert sweep.loc[(layer, head), "metric_ablated"] == pytest.approx(nll.mean().item(), abs=1e-4)
    card = cards.head_ablations(two_layer, "induction", tokens, T).set_index(["layer", "head"])
    np.testing.assert_allclose(sweep["metric_ablated"], card["ablated_loss_repeated_half"], atol=1e-4)


def test_clustering_puts_the_induction_heads_together(two_layer, two_layer_scores, segments):
    clusterer = HeadClusterer(seed=0, n_bootstrap=5).fit(two_layer, segments)
    labels = clusterer.labels_.set_index(["layer", "head"])["cluster"]
    induction = [(1, h) for h in range(4)]
    assert labels[induction].nunique() == 1
    others = [h for h in labels.index if h not in induction]
    assert not (labels[others] == labels[induction[0]]).any()
    d = clusterer.distance_
    ind, rest = [4, 5, 6, 7], [0, 1, 2, 3]
    assert d[np.ix_(ind, ind)].max() < 0.5 * d[np.ix_(ind, rest)].min()

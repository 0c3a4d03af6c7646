"""Head distances and clustering: JS against scipy, planted groups separated perfectly,
determinism, the cluster table and stability."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import adjusted_rand_score

from headlens.errors import HeadlensError
from headlens.patterns.capture import capture_patterns
from headlens.patterns.clusters import HeadClusterer, describe_cluster, js_distance
from headlens.synthetic.planted import planted_model

# two groups of four heads: previous-token heads and first-token heads, spread over both layers
GROUPS = {(0, 0): "previous", (0, 1): "first", (0, 2): "previous", (0, 3): "first",
          (1, 0): "first", (1, 1): "previous", (1, 2): "first", (1, 3): "previous"}
TRUTH = [0 if GROUPS[(layer, head)] == "previous" else 1 for layer in range(2) for head in range(4)]


@pytest.fixture(scope="module")
def planted():
    model = planted_model(GROUPS, vocab_size=30, n_ctx=24)
    data = torch.randint(0, 30, (24, 16), generator=torch.Generator().manual_seed(0))
    return model, data


def test_js_distance_matches_scipy():
    model = planted_model({(0, 0): "previous", (0, 1): "first", (1, 2): "offset:-2", (1, 3): "self"},
                          causal=False, vocab_size=12, n_ctx=12)
    data = [list(range(1, 9)), list(range(3, 8)), [2, 2, 5]]  # unequal lengths: padding
    distance = js_distance(model, data, batch_size=2, eps=1e-3)
    reference, rows = np.zeros((8, 8)), 0
    for pb in capture_patterns(model, data, batch_size=1):
        A = pb.patterns[0].double().numpy()
        T = A.shape[-1]
        A = (1 - 1e-3) * A + 1e-3 / T
        for i in range(T):
            rows += 1
            for a in range(8):
                for b in range(8):
                    reference[a, b] += jensenshannon(A[a, i], A[b, i], base=2) ** 2
    np.testing.assert_allclose(distance, reference / rows, atol=1e-5)
    assert distance[0, 1] > 0.5 and np.allclose(distance, distance.T)


@pytest.mark.parametrize("method", ["agglomerative", "kmeans", "gmm"])
def test_planted_groups_are_separated(method, planted):
    model, data = planted
    fit = HeadClusterer(method=method, n_bootstrap=4, seed=0, induction=False).fit(model, data)
    assert fit.n_clusters_ == 2
    assert adjusted_rand_score(TRUTH, fit.labels_["cluster"]) == 1.0
    assert fit.stability_["ari_mean"] == 1.0 and len(fit.stability_["ari"]) == 4
    assert (fit.table_["stability"] == 1.0).all()  # planted clusters: every replicate finds each one whole
    assert list(fit.labels_.columns) == ["layer", "head", "cluster"]
    assert fit.distance_.shape == (8, 8) and fit.embedding_.shape == (8, 2)
    table = fit.table_.set_index("cluster")
    assert table["size"].tolist() == [4, 4]
    assert table.loc[0, "members"] == "0.0, 0.2, 1.1, 1.3"
    assert "previous token (1.00)" in table.loc[0, "description"]
    assert "first token" in table.loc[1, "description"]
    assert table.loc[0, "mean_score_previous_token"] > 0.99


def test_deterministic_and_options(planted):
    model, data = planted
    a = HeadClusterer(n_bootstrap=3, seed=5, induction=False).fit(model, data)
    b = HeadClusterer(n_bootstrap=3, seed=5, induction=False).fit(model, data)
    assert a.labels_.equals(b.labels_) and np.array_equal(a.embedding_, b.embedding_)
    assert a.stability_ == b.stability_
    three = HeadClusterer(n_clusters=3, embedding="tsne", n_bootstrap=0, induction=False).fit(model, data)
    assert three.labels_["cluster"].nunique() == 3 and three.embedding_.shape == (8, 2)
    assert np.isnan(three.stability_["ari_mean"])
    medoid = three.typical_heads(0, n=2)
    assert len(medoid) == 2 and all(lh in model.head_labels() for lh in medoid)


def test_given_scores_are_used(planted):
    model, data = planted
    from headlens.patterns.scores import pattern_scores

    scores = pattern_scores(model, data, induction=False)
    fit = HeadClusterer(n_bootstrap=0, induction=False).fit(model, data, scores=scores)
    assert "role" in fit.scores_ and fit.scores_["score_self"].equals(scores["score_self"])
    with pytest.raises(HeadlensError, match="other heads"):
        HeadClusterer(n_bootstrap=0).fit(model, data, scores=scores.iloc[:5])


def test_describe_cluster():
    import pandas as pd

    members = pd.DataFrame({"layer": [0, 0, 1], "score_previous_token": [0.9, 0.8, 0.7],
                            "score_first_token": [0.1, 0.0, 0.1], "score_entropy_norm": [0.1, 0.2, 0.1]})
    assert describe_cluster(members) == ("3 heads, layers 0-1 (mostly 0): attend to the previous token (0.80); "
                                         "normalised entropy 0.13")
    broad = members.assign(score_previous_token=0.1, score_entropy_norm=0.9, layer=2)
    assert describe_cluster(broad) == "3 heads, all in layer 2: attend broadly (normalised entropy 0.90)"


def test_bad_parameters(planted):
    model, data = planted
    for kwargs, match in [({"method": "dbscan"}, "method"), ({"embedding": "umap"}, "embedding"),
                          ({"n_clusters": 0}, "n_clusters"), ({"n_clusters": 99}, "n_clusters"),
                          ({"n_bootstrap": -1}, "n_bootstrap"), ({"linkage": "ward"}, "linkage")]:
        with pytest.raises(HeadlensError, match=match):
            HeadClusterer(**kwargs).fit(model, data)
    with pytest.raises(HeadlensError, match="eps"):
        js_distance(model, data, eps=0)


def test_stability_skips_resamples_without_examples(planted):
    """Two texts: some Poisson resamples draw none (NaN distances); they are skipped, not a crash."""
    model, data = planted
    st = HeadClusterer(n_bootstrap=20, seed=0, induction=False).fit(model, data[:2]).stability_
    assert st["n_empty"] > 0 and len(st["ari"]) == 20 - st["n_empty"]
    assert np.isfinite(st["ari_mean"])

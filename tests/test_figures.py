"""Pattern and cluster figures are written as non-empty PNG and SVG files."""
import os

import pytest
import torch

from headlens.errors import HeadlensError
from headlens.patterns.clusters import HeadClusterer
from headlens.reporting.figures.patterns import cluster_figures, pattern_gallery, score_heatmap
from headlens.synthetic.planted import planted_model


@pytest.fixture(scope="module")
def fitted():
    model = planted_model({(0, 0): "previous", (0, 1): "first", (1, 0): "previous", (1, 1): "self"},
                          vocab_size=20, n_ctx=16)
    data = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(0))
    return model, data, HeadClusterer(n_bootstrap=0, induction=False).fit(model, data)


def written(paths):
    assert [os.path.splitext(p)[1] for p in paths] == [".png", ".svg", ".pdf"]
    return all(os.path.getsize(p) > 1000 for p in paths)


def test_cluster_figures(fitted, tmp_path):
    model, data, fit = fitted
    out = cluster_figures(model, fit, data[0].tolist(), str(tmp_path / "figs"),
                          score_columns=("score_previous_token", "score_distance"))
    assert set(out) == {"heatmap_score_previous_token", "heatmap_score_distance", "clustermap", "embedding", "gallery"}
    assert all(written(paths) for paths in out.values())
    with open(out["gallery"][1]) as f:
        assert "head 0.0" in f.read()  # titles name the heads


def test_gallery_with_token_labels(minilm, tmp_path):
    paths = pattern_gallery(minilm, "The cat sat on the mat.", {"a": [(0, 2)], "b": [(1, 11), (3, 3)]},
                            str(tmp_path / "gallery.png"))
    assert written(paths) and paths[0].endswith("gallery.png")
    with open(paths[1]) as f:
        svg = f.read()
    assert "cat" in svg and "[CLS]" in svg


def test_bad_input(fitted, tmp_path):
    model, _, fit = fitted
    with pytest.raises(HeadlensError, match="column"):
        score_heatmap(fit.scores_, "score_nothing", str(tmp_path / "x"))
    with pytest.raises(HeadlensError, match="not in the model"):
        pattern_gallery(model, [1, 2, 3], {0: [(5, 0)]}, str(tmp_path / "y"))

"""Roles and pattern classes: right on hand-set heads, thresholds exposed, rules as documented."""
import pandas as pd
import pytest
import torch

from headlens.errors import HeadlensError
from headlens.patterns.capture import capture_patterns
from headlens.patterns.roles import RoleThresholds, assign_roles
from headlens.patterns.scores import pattern_scores
from headlens.synthetic.planted import planted_model

PLANTED = {(0, 1): "previous", (1, 2): "first", (0, 3): "self", (1, 0): "offset:-3"}


@pytest.fixture(scope="module")
def planted():
    model = planted_model(PLANTED, n_layers=2, n_heads=4, vocab_size=40, n_ctx=32)
    data = torch.randint(0, 40, (16, 24), generator=torch.Generator().manual_seed(0))
    return model, data


def test_planted_heads_do_what_they_claim(planted):
    model, data = planted
    (pb,) = capture_patterns(model, data[:4], batch_size=4)
    A = pb.patterns  # [B, N, P, P]; head index = 4 * layer + head
    i = torch.arange(1, A.shape[-1])
    assert A[:, 1, i, i - 1].min() > 0.99  # previous token
    assert A[:, 6, 1:, 0].min() > 0.99  # first token
    assert torch.diagonal(A[:, 3], dim1=-2, dim2=-1).min() > 0.99  # self
    i3 = torch.arange(3, A.shape[-1])
    assert A[:, 4, i3, i3 - 3].min() > 0.99  # offset -3
    uniform = A[:, 0]  # an unnamed head: uniform over the visible keys
    expected = torch.ones_like(uniform).tril() / torch.arange(1, A.shape[-1] + 1)[:, None]
    assert torch.allclose(uniform, expected.expand_as(uniform), atol=1e-6)


def test_roles_on_planted_heads(planted):
    model, data = planted
    roles = assign_roles(pattern_scores(model, data, probe_len=10)).set_index(["layer", "head"])
    assert roles.index[roles["role"] == "previous-token"].tolist() == [(0, 1)]
    assert roles.index[roles["role"] == "first-token sink"].tolist() == [(1, 2)]
    assert roles.loc[(0, 3), "role"] == "self"
    assert roles.loc[(1, 0), "role"] == "positional (-3)"
    unnamed = [lh for lh in roles.index if lh not in PLANTED]
    assert (roles.loc[unnamed, "role"] == "broad").all()
    assert roles.loc[(0, 1), "pattern_class"] == "diagonal"
    assert roles.loc[(1, 2), "pattern_class"] == "vertical"
    assert (roles.loc[unnamed, "pattern_class"] == "heterogeneous").all()


def test_thresholds_are_parameters(planted):
    model, data = planted
    scores = pattern_scores(model, data, induction=False)
    strict = assign_roles(scores, previous_token=1.5).set_index(["layer", "head"])
    assert strict.loc[(0, 1), "role"] != "previous-token"
    same = assign_roles(scores, RoleThresholds(broad=0.99)).set_index(["layer", "head"])
    assert same.loc[(0, 0), "role"] == "broad"
    nothing_broad = assign_roles(scores, broad=1.01).set_index(["layer", "head"])
    assert nothing_broad.loc[(0, 0), "role"] in ("mixed", "local")
    with pytest.raises(HeadlensError, match="unknown thresholds"):
        assign_roles(scores, previous=0.5)
    with pytest.raises(HeadlensError, match="positive"):
        RoleThresholds(self_attention=-1)
    with pytest.raises(HeadlensError, match="lacks columns"):
        assign_roles(scores.drop(columns="score_self"))


def row(**scores):
    base = dict(layer=0, head=0, score_previous_token=0.0, score_next_token=0.0, score_self=0.0,
                score_first_token=0.0, score_separator=0.0, score_punctuation=0.0,
                score_entropy_norm=0.5, score_local=0.0, score_induction=0.0,
                score_duplicate_token=0.0, peak_offset=0, score_peak_offset=0.0)
    return {**base, **scores}


def test_rules():
    table = pd.DataFrame([
        row(score_separator=0.6, score_first_token=0.2),                     # vertical, separator
        row(score_previous_token=0.3, score_self=0.4, score_local=0.8),      # diagonal, local
        row(score_first_token=0.4, score_previous_token=0.4, score_local=0.45),  # vertical+diagonal
        row(score_local=0.7, score_self=0.1, score_entropy_norm=0.9),        # block, broad
        row(score_punctuation=0.2, score_local=0.2),                         # heterogeneous, mixed
        row(score_induction=0.7, score_previous_token=0.6),                  # induction wins
        row(score_peak_offset=0.6, peak_offset=2),                           # positional
    ])
    out = assign_roles(table)
    assert out["pattern_class"].tolist() == ["vertical", "diagonal", "vertical+diagonal", "block",
                                             "heterogeneous", "diagonal", "heterogeneous"]
    assert out["role"].tolist() == ["separator", "local", "mixed", "broad", "mixed", "induction",
                                    "positional (+2)"]

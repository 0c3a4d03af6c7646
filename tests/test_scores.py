"""Pattern scores: definitions against plain loops, padding, the induction probe on planted heads,
and parity with TransformerLens' head detector."""
import copy
import math

import numpy as np
import pytest
import torch

from headlens.errors import HeadlensError
from headlens.patterns.capture import capture_patterns
from headlens.patterns.scores import (
    SCORE_COLUMNS,
    detector_scores,
    pattern_scores,
    probe_tokens,
    punctuation_token_mask,
)
from headlens.synthetic.planted import planted_model

TEXTS = ["The cat sat on the mat, and the cat slept.", "Dogs bark!", "Is this a question? Yes, it is.",
         "A longer sentence makes sure that the batch is padded for the shorter ones here."]


@pytest.fixture(scope="module")
def tiny_bert(make_tiny_bert):
    return make_tiny_bert(seed=1)


def reference_scores(model, texts, window=3):
    """Every dataset score by explicit loops over sentences, heads and queries (no padding)."""
    punct = set(".,!?;:'\"()-")
    sums, n = {}, {}

    def add(name, head, value):
        sums[(name, head)] = sums.get((name, head), 0.0) + float(value)
        n[(name, head)] = n.get((name, head), 0) + 1

    for text in texts:
        (pb,) = capture_patterns(model, [text])
        ids = pb.input_ids[0].tolist()
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        is_sep = np.array([i in model.cfg.sep_token_ids for i in ids])
        is_punct = np.array([p in punct for p in pieces])
        A = pb.patterns[0].double().numpy()
        T = len(ids)
        for h in range(A.shape[0]):
            for i in range(T):
                keys = np.arange(i + 1) if model.cfg.causal else np.arange(T)
                row = A[h, i, keys]
                if i >= 1:
                    add("score_previous_token", h, A[h, i, i - 1])
                    add("score_first_token", h, A[h, i, 0])
                if i + 1 < T:
                    add("score_next_token", h, A[h, i, i + 1])
                add("score_self", h, A[h, i, i])
                add("score_separator", h, row[is_sep[keys]].sum())
                add("score_punctuation", h, row[is_punct[keys]].sum())
                add("score_distance", h, (row * np.abs(i - keys)).sum())
                add("score_local", h, row[np.abs(i - keys) <= window].sum())
                entropy = -sum(p * math.log(p) for p in row if p > 0)
                add("score_entropy", h, entropy)
                if len(keys) > 1:
                    add("score_entropy_norm", h, entropy / math.log(len(keys)))
                add("score_confidence", h, row.max())
    return {key: sums[key] / n[key] for key in sums}


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_scores_match_loops_and_ignore_padding(which, tiny_bert, tiny_gpt2):
    model = tiny_bert if which == "bert" else tiny_gpt2
    padded = pattern_scores(model, TEXTS, batch_size=4, induction=False)
    alone = pattern_scores(model, TEXTS, batch_size=1, induction=False)
    assert list(padded.columns[:2]) == ["layer", "head"] and len(padded) == model.cfg.n_layers * 4
    assert set(SCORE_COLUMNS) <= set(padded.columns)
    assert padded[["score_induction", "score_duplicate_token"]].isna().all().all()
    reference = reference_scores(model, TEXTS)
    for (name, h), value in reference.items():
        assert padded[name][h] == pytest.approx(value, abs=1e-5), (name, h)
    numeric = [c for c in SCORE_COLUMNS if c not in ("score_induction", "score_duplicate_token")]
    np.testing.assert_allclose(padded[numeric].to_numpy(), alone[numeric].to_numpy(), atol=1e-5)
    if which == "bert":
        assert padded["score_separator"].gt(0).all() and padded["score_punctuation"].gt(0).all()
    else:
        assert (padded["score_next_token"] == 0).all()


def test_minilm_scores_match_transformers_attentions(minilm, minilm_path):
    """[SEP], [CLS] and previous-token mass from transformers' own attention weights."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    sep, first, prev, rows = 0, 0, 0, 0
    for text in TEXTS:
        enc = minilm.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            A = torch.stack(hf(**enc, output_attentions=True).attentions)[:, 0]  # [L, H, T, T]
        T = A.shape[-1]
        sep, first = sep + A[..., -1].sum(-1), first + A[..., 1:, 0].sum(-1)
        prev, rows = prev + torch.diagonal(A, -1, -2, -1).sum(-1), rows + T
    ours = pattern_scores(minilm, TEXTS, batch_size=4, induction=False)
    np.testing.assert_allclose(ours["score_separator"], (sep / rows).flatten(), atol=1e-5)
    n_prev = rows - len(TEXTS)
    np.testing.assert_allclose(ours["score_first_token"], (first / n_prev).flatten(), atol=1e-5)
    np.testing.assert_allclose(ours["score_previous_token"], (prev / n_prev).flatten(), atol=1e-5)
    assert ours["score_previous_token"].max() > 0.9  # MiniLM's head 0.2


def test_punctuation_mask(bert_tokenizer, tiny_bert):
    mask = punctuation_token_mask(tiny_bert)
    ids = bert_tokenizer.convert_tokens_to_ids([".", ",", "!", "?", "the", "[SEP]", "[CLS]", "##s", "1"])
    assert mask[ids].tolist() == [True] * 4 + [False] * 5


def test_probe_and_planted_heads():
    model = planted_model({(0, 0): "previous", (0, 1): "first", (1, 0): "induction", (1, 1): "duplicate"},
                          vocab_size=50)
    ids, start, T = probe_tokens(model, n_seqs=8, half_len=10, seed=0)
    assert start == 0 and T == 10 and torch.equal(ids[:, :10], ids[:, 10:20])
    data = torch.randint(0, 50, (6, 20), generator=torch.Generator().manual_seed(0))
    s = pattern_scores(model, data, probe_len=10).set_index(["layer", "head"])
    assert s.loc[(0, 0), "score_previous_token"] > 0.99 and s.loc[(0, 1), "score_first_token"] > 0.99
    assert s.loc[(1, 0), "score_induction"] > 0.8 > s.drop((1, 0))["score_induction"].max()
    assert s.loc[(1, 1), "score_duplicate_token"] > 0.8 > s.drop((1, 1))["score_duplicate_token"].max()
    assert s.loc[(0, 0), "peak_offset"] == -1 and s.loc[(0, 3), "score_entropy_norm"] == pytest.approx(1.0)


def test_probe_excludes_special_tokens(tiny_bert, bert_tokenizer):
    ids, start, T = probe_tokens(tiny_bert, n_seqs=16, half_len=12, seed=1)
    assert ids[0, 0] == bert_tokenizer.cls_token_id and ids[0, -1] == bert_tokenizer.sep_token_id
    body = ids[:, start: start + 2 * T]
    pieces = bert_tokenizer.convert_ids_to_tokens(body.flatten().tolist())
    assert not any(p.startswith("[") and p.endswith("]") for p in pieces)


SEQS = ["the cat sat on the mat and the cat sat on the hat", "one two three one two three one two",
        "a b a b a c a b", "no repeats in this line at all"]


@pytest.fixture(scope="module")
def sharp_pair(tiny_gpt2_hf, bert_tokenizer):
    """The tiny GPT-2 with 30x larger query weights (peaked, non-uniform attention, so that the
    templates give clearly different scores): a TransformerBridge and a headlens model on it."""
    from transformer_lens.model_bridge import TransformerBridge

    import headlens

    hf = copy.deepcopy(tiny_gpt2_hf)
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, : hf.config.n_embd] *= 30
    # the bridge sets a BOS token on its tokenizer: a copy keeps the shared fixture intact
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf),
                                                 tokenizer=copy.deepcopy(bert_tokenizer))
    return bridge, headlens.from_hf_model(hf, bert_tokenizer)


@pytest.mark.parametrize("name", ["previous_token_head", "duplicate_token_head", "induction_head"])
def test_detector_parity_with_transformer_lens(name, sharp_pair):
    from transformer_lens.head_detector import detect_head

    bridge, model = sharp_pair
    ids = [bridge.to_tokens(s)[0].tolist() for s in SEQS]
    assert ids == [model.to_tokens(s)[0].tolist() for s in SEQS]
    for exclude_bos in (False, True):
        for exclude_current in (False, True):
            theirs = detect_head(bridge, SEQS, name, exclude_bos=exclude_bos,
                                 exclude_current_token=exclude_current, error_measure="mul")
            ours = detector_scores(model, ids, name, exclude_bos=exclude_bos,
                                   exclude_current_token=exclude_current, batch_size=3)
            assert ours.shape == (12, 3)
            diff = np.abs(ours[f"detector_{name}"].to_numpy() - theirs.flatten().numpy()).max()
            assert diff < 1e-4, (name, exclude_bos, exclude_current, diff)
            assert theirs.std() > 0.005  # heads differ: a comparison that can fail


def test_detector_previous_token_is_rescaled_clark_score(tiny_gpt2):
    ids = tiny_gpt2.to_tokens(SEQS[0])
    T = ids.shape[1]
    clark = pattern_scores(tiny_gpt2, ids, induction=False)["score_previous_token"]
    detector = detector_scores(tiny_gpt2, ids, "previous_token_head")["detector_previous_token_head"]
    np.testing.assert_allclose(detector, clark * (T - 1) / T, atol=1e-6)


def test_bad_input(tiny_gpt2):
    with pytest.raises(HeadlensError, match="name must be one of"):
        detector_scores(tiny_gpt2, SEQS, "copy_head")
    with pytest.raises(HeadlensError, match="empty"):
        pattern_scores(tiny_gpt2, [])
    with pytest.raises(HeadlensError, match="window"):
        pattern_scores(tiny_gpt2, SEQS, window=-1)


def test_pruned_model_keeps_original_head_ids(tiny_gpt2):
    from headlens.pruning.physical import prune_heads

    pruned = prune_heads(tiny_gpt2, {2: [1, 3]})  # last layer: the other heads' patterns stay the same
    full = pattern_scores(tiny_gpt2, TEXTS, induction=False).set_index(["layer", "head"])
    ours = pattern_scores(pruned, TEXTS, induction=False)
    assert list(zip(ours["layer"], ours["head"])) == pruned.head_labels()
    assert (2, 2) in pruned.head_labels() and (2, 1) not in pruned.head_labels()
    np.testing.assert_allclose(ours.set_index(["layer", "head"])[SCORE_COLUMNS[:10]],
                               full.loc[pruned.head_labels(), SCORE_COLUMNS[:10]], atol=1e-5)


def test_scores_command(tmp_path, capsys):
    import pandas as pd

    from headlens.cli import main

    out = tmp_path / "out"
    assert main(["scores", "--n", "8", "--no-clusters", "--out", str(out)]) == 0
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 72 and {"role", "pattern_class", "score_induction"} <= set(table.columns)
    assert table.loc[(table.layer == 0) & (table["head"] == 2), "role"].item() == "previous-token"
    assert "72 heads" in capsys.readouterr().out
    assert main(["scores", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_scores_command_with_clusters_and_figures(tmp_path, capsys):
    import pandas as pd

    from headlens.cli import main

    out = tmp_path / "out"
    assert main(["scores", "--n", "12", "--n-bootstrap", "2", "--out", str(out), "--figures"]) == 0
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 72 and table["cluster"].notna().all()
    assert (out / "cluster_table.csv").exists() and (out / "pattern_gallery.svg").stat().st_size > 0
    assert "cluster stability" in capsys.readouterr().out

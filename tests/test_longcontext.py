"""Long-context tasks, decoding from a prefilled cache, KV plans and ``headlens kv-heads`` on a
small random decoder (the real-model checks are in test_kvpress_handoff.py and the study)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import headlens
from headlens.errors import HeadlensError
from headlens.importance.ablation import ablate
from headlens.importance.streaming import Streaming
from headlens.longcontext import decode
from headlens.longcontext.plans import (
    full_fraction_for_compression,
    kv_memory,
    kv_plan_record,
    read_kv_plan,
    write_kv_plan,
)
from headlens.longcontext.tasks import build_example, list_records, load_long_context

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def decoder_folder(bert_tokenizer, tmp_path_factory):
    config = transformers.LlamaConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=bert_tokenizer.cls_token_id,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("decoder")
    hf.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder(decoder_folder):
    return headlens.load(decoder_folder)


def test_examples_are_exactly_as_long_as_asked_with_the_needle_inside(bert_tokenizer):
    for r in list_records(lengths=(512, 2048), split="heldout")[::9]:
        e = build_example(r, bert_tokenizer, bert_tokenizer.cls_token_id)
        assert len(e["tokens"]) == r["length"]
        assert 0 < e["context_len"] <= e["answer_start"] < r["length"]
        if r["kind"] != "lm":
            a, b = e["needle_span"]
            needle = bert_tokenizer.decode(e["tokens"][a:b])
            answer = bert_tokenizer.decode(e["tokens"][e["answer_start"]:]).strip()
            assert answer in needle.replace(" ", "") or answer in needle


def test_splits_share_no_prose():
    sel, held = list_records(split="select"), list_records(split="heldout")
    assert max(r["offset"] + 6 * r["length"] for r in sel) <= min(r["offset"] for r in held)
    assert {r["kind"] for r in sel} == {"passkey", "needle", "multikey", "lm"}


def test_plan_decoding_equals_full_forward_ablation(decoder):
    """A plan run from the prefilled cache equals the full forward pass with the same heads'
    scores masked (headlens.importance.ablation.ablate, naive hooks), and the full model's
    continuation equals its plain forward pass."""
    task = load_long_context(decoder, ("passkey", "lm"), (512,), "select", n_per_group=2)
    pre = decode.prefill(decoder, task, batch_size=2)
    spec = Streaming(sink=4, window=32)
    plan = {0: [1], 1: [0]}
    mine = decode.evaluate(decoder, task, pre, plan, spec, metrics=("loss",))["loss"]
    heads = decode.query_heads_of(decoder, plan)
    assert heads == [(0, 2), (0, 3), (1, 0), (1, 1)]
    np.testing.assert_allclose(mine, ablate(decoder, task, heads, spec, batch_size=2), atol=1e-5)
    clean = decode.evaluate(decoder, task, pre, metrics=("loss",))["loss"]
    np.testing.assert_allclose(clean, task.evaluate(decoder, batch_size=2), atol=1e-5)
    assert np.abs(mine - clean).max() > 1e-4


def test_memory_and_compression_follow_from_config_and_length(decoder):
    cfg = decoder.cfg  # 2 layers x 2 kv heads, d_head 8
    m = kv_memory(cfg, 1000, {0: [1]}, sink=4, recent=96)
    assert m["full_bytes"] == 4 * 1000 * 2 * 8 * 4
    assert m["plan_bytes"] == 3 * 1000 * 2 * 8 * 4 + 100 * 2 * 8 * 4
    assert m["saved_fraction"] == pytest.approx(0.25 * 0.9)
    ff = full_fraction_for_compression(0.45, 1000, 4, 96)
    assert ff == pytest.approx(0.5)


def test_kv_plan_round_trip_and_bad_plans(decoder, tmp_path):
    record = kv_plan_record(decoder, {1: [0, 1]}, 4, 64, "headlens")
    path = write_kv_plan(tmp_path / "kv_plan.json", record)
    back = read_kv_plan(path)
    assert back["streaming"] == {"1": [0, 1]} and back["kv_heads"][2:] == [[1, 0, 0.0], [1, 1, 0.0]]
    bad = dict(record, streaming={"1": [5]})
    with pytest.raises(HeadlensError, match="must list kv heads"):
        read_kv_plan(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(HeadlensError, match="not valid JSON"):
        read_kv_plan(tmp_path / "broken.json")
    with pytest.raises(HeadlensError, match="version"):
        read_kv_plan(dict(record, version=7))


def test_long_context_needs_a_decoder_and_fitting_lengths(decoder, minilm):
    with pytest.raises(HeadlensError, match="exceeds the model's context"):
        load_long_context(decoder, lengths=(2048,))
    task = load_long_context(decoder, ("passkey",), (512,), n_per_group=1)
    with pytest.raises(HeadlensError, match="needs a decoder"):
        task.batches(minilm)


@pytest.fixture(scope="module")
def result(decoder):
    from headlens.longcontext.analysis import kv_heads

    return kv_heads(decoder, lengths=(512,), n_per_group=1, n_random=2, n_bootstrap=50, window=32, progress=False)


def test_cli_kv_heads_writes_the_folder(decoder_folder, result, tmp_path, monkeypatch):
    """``headlens kv-heads`` passes its options on and writes the folder (the analysis itself is
    the fixture's, run once)."""
    from headlens.cli import main
    from headlens.longcontext import analysis

    seen = {}

    def fake(model, **kwargs):
        seen.update(kwargs)
        return result

    monkeypatch.setattr(analysis, "kv_heads", fake)
    out = tmp_path / "kv"
    assert main(["kv-heads", "--model", str(decoder_folder), "--lengths", "512", "--n-per-group", "1",
                 "--n-random", "2", "--n-bootstrap", "50", "--window", "32", "--out", str(out), "--no-progress"]) == 0
    assert seen["lengths"] == [512] and seen["window"] == 32 and seen["n_random"] == 2
    kv = pd.read_csv(out / "kv_heads.csv")
    assert list(kv.columns) == ["layer", "kv_head", "query_heads", "sink_rate", "retrieval_score",
                                "streaming_damage", "ci_low", "ci_high", "decision"]
    assert list(kv.query_heads) == ["0 1", "2 3", "0 1", "2 3"] and (kv.decision == "stream").sum() == 2
    assert (kv.ci_low <= kv.streaming_damage).all() and (kv.streaming_damage <= kv.ci_high).all()
    plan = read_kv_plan(out / "kv_plan.json")
    streamed = {(int(a), b) for a, kvs in plan["streaming"].items() for b in kvs}
    assert streamed == {(int(a), int(b)) for a, b in kv[kv.decision == "stream"][["layer", "kv_head"]].values}
    assert plan["memory"]["saved_fraction"] == pytest.approx(0.5 * (1 - 36 / 512))
    plans = pd.read_csv(out / "plans.csv")
    assert {"full", "headlens", "retrieval", "sink", "random"} <= set(plans.method)
    for name in ("kv_streaming_damage", "kv_head_scores", "kv_plan_comparison"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert not list(out.glob(".staging*"))
    assert json.loads((out / "kv_plan.json").read_text())["schema"] == "headlens.kv_plan"


def test_kv_heads_refuses_an_encoder(minilm_path, tmp_path, capsys):
    from headlens.cli import main

    assert main(["kv-heads", "--model", minilm_path, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "needs a decoder" in capsys.readouterr().err


def test_long_context_report_section(result, tmp_path):
    from headlens.reporting.longcontext import long_context_section

    section = long_context_section(result, tmp_path)
    assert section["id"] == "long_context" and section["title"] == "Long context"
    assert any("retrieval score above 0.1" in n for n in section["notes"])
    assert any(n.startswith("Removing the") for n in section["notes"])
    for t in section["tables"]:
        assert (tmp_path / t["file"]).is_file()
    assert len(pd.read_csv(tmp_path / section["tables"][0]["file"])) == 4
    for f in section["figures"]:
        assert (tmp_path / f["path"]).is_file()

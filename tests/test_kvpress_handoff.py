"""The KV plan handed to a real consumer: kvpress, in its own virtualenv, reading only the files
headlens wrote (the exported SmolLM2 transformers folder, kv_plan.json, the prompts' token ids),
runs the plan as a DuoAttentionPress offline; the cache keeps exactly what the plan says, the
needle is still found, and the answer losses equal headlens' own masked run on the same prompts.
kvpress' StreamingLLMPress (which drops keys, so the tail's positions must be given) equals
headlens streaming every kv head with the same sink and window, on a needle and on an LM example
(whose first scored token is predicted by the context's last position)."""
import pytest

import headlens
from headlens.importance.streaming import Streaming
from headlens.io.to_hf import save_hf
from headlens.longcontext import decode
from headlens.longcontext.handoff import kvpress_python, run_kvpress, write_prompts
from headlens.longcontext.plans import as_layers, kv_memory, kv_plan_record, order_kv_heads, write_kv_plan
from headlens.longcontext.scores import collect, head_scores, kv_head_scores
from headlens.longcontext.tasks import load_long_context

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(kvpress_python() is None,
                                 reason="kvpress' virtualenv .venv-kvpress is missing: run scripts/setup.sh --test")]
SINK, RECENT = 4, 64


def test_kvpress_runs_headlens_plan_as_planned(tmp_path):
    model = headlens.load("smollm2")
    task = load_long_context(model, ("passkey", "lm"), (512,), "heldout", n_per_group=1)
    assert task.kinds == ["passkey", "lm"]
    stats, pre = collect(model, task, batch_size=2)
    kv = kv_head_scores(head_scores(model, stats, n_bootstrap=0))
    plan = as_layers(order_kv_heads(kv, "retrieval")[:30])  # a third of the kv heads stream
    mine = decode.evaluate(model, task, pre, plan, Streaming(SINK, RECENT))
    full = decode.evaluate(model, task, pre)
    assert full["accuracy"][0] == 1.0 and mine["accuracy"][0] == 1.0
    every = {layer: list(range(model.cfg.n_kv_heads)) for layer in range(model.cfg.n_layers)}
    kept = [int(c * (1 - 0.5)) for c in task.context_len]  # StreamingLLMPress(0.5) keeps 4 sinks + the rest recent
    streamed = [decode.evaluate(model, task, pre, every, Streaming(SINK, n - SINK))["loss"][i]
                for i, n in enumerate(kept)]

    write_kv_plan(tmp_path / "kv_plan.json", kv_plan_record(model, plan, SINK, RECENT, "retrieval"))
    save_hf(model, tmp_path / "hf")
    write_prompts(task, tmp_path / "prompts.jsonl")
    cfg = model.cfg
    del model
    res = run_kvpress(tmp_path / "hf", tmp_path / "prompts.jsonl",
                      {"plan": f"duo:{tmp_path / 'kv_plan.json'}", "full": "full", "knorm": "knorm:0.5",
                       "stream": "streaming_llm:0.5"},
                      tmp_path / "out.jsonl", check_first=True, timeout=1800)
    checks = res[res.get("check", False) == True]  # noqa: E712
    assert len(checks) == 2 and checks.same_cache.all() and (checks.max_logit_diff < 1e-5).all()
    runs = res[res.get("check", False) != True].set_index(["config", "id"])  # noqa: E712
    L, K = cfg.n_layers, cfg.n_kv_heads
    for i, rid in enumerate(task.record_ids):
        C = task.context_len[i]
        p, f, k, s = (runs.loc[(name, rid)] for name in ("plan", "full", "knorm", "stream"))
        assert f.kept == f.total == L * K * C
        expect = kv_memory(cfg, C, plan, SINK, RECENT)
        assert p.kept == expect["plan_bytes"] // (2 * cfg.d_head * 4) and p.total == L * K * C
        assert p.compression_ratio == pytest.approx(expect["saved_fraction"], abs=1e-6)  # kvpress: float32
        assert k.kept == L * K * int(C * 0.5) and k.total == L * K * C  # scorer presses really drop entries
        assert s.kept == L * K * kept[i]
        if task.kinds[i] == "passkey":
            assert bool(f.correct) and bool(p.correct)  # the needle is still found
        assert p.loss == pytest.approx(float(mine["loss"][i]), abs=2e-3)
        assert f.loss == pytest.approx(float(full["loss"][i]), abs=2e-3)
        assert s.loss == pytest.approx(float(streamed[i]), abs=2e-3)


"""SmolLM2's long-context heads and KV-cache decisions: sink, retrieval and streaming heads, a KV
plan chosen on one split and scored on another against random, pattern-score and kvpress presses.

    python analyses/longcontext_study.py                 # compute, then write reports/longcontext/
    python analyses/longcontext_study.py --render-only   # redo the page from the saved results

Compute (``headlens.longcontext.analysis.kv_heads``): on the select split, each query head's sink
rate and retrieval score and each kv head's streaming damage (exact sweep, bootstrap CIs); the
plan streams the least damaging kv heads; on the held-out split the plan, 5 random plans, and
the retrieval-score and sink-rate plans at 25/50/75% KV memory saved, and the top retrieval
heads removed against as many random heads. Then kvpress, in its own virtualenv, on the exported
transformers folder: DuoAttentionPress with headlens' plans and with the random plan, and its
scorer presses (Knorm, SnapKV, StreamingLLM) at the same compressions, on the same held-out
token ids. Lengths and counts are chosen so that a CPU run finishes within 15 minutes on a
quiet 2-core machine (see timings.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPORTS, markdown  # noqa: E402

OUT = REPORTS / "longcontext"
COMPRESSIONS = (0.25, 0.5, 0.75)
PRESSES = ("knorm", "snapkv", "streaming_llm")


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compute(args) -> None:
    import headlens
    from headlens.files import writable_folder
    from headlens.io.to_hf import save_hf
    from headlens.longcontext.analysis import kv_heads
    from headlens.longcontext.handoff import run_kvpress, write_prompts
    from headlens.longcontext.plans import (
        as_layers,
        full_fraction_for_compression,
        kv_plan_record,
        n_streaming,
        write_kv_plan,
    )
    from headlens.longcontext.tasks import KINDS, load_long_context

    out = writable_folder(args.out)
    t0, c0, timings = time.perf_counter(), cpu_seconds(), {}
    model = headlens.load("smollm2")
    timings["load"] = time.perf_counter() - t0
    res = kv_heads(model, lengths=(args.length,), n_per_group=args.n, sink=args.sink, window=args.window,
                   full_fraction=0.5, compressions=COMPRESSIONS, n_random=5, n_bootstrap=1000, seed=0,
                   batch_size=4, progress=False)
    timings["headlens"] = time.perf_counter() - t0 - timings["load"]
    for name, df in (("kv_heads", res.kv), ("query_heads", res.heads), ("plans", res.plans),
                     ("retrieval_ablation", res.retrieval_ablation)):
        df.to_csv(out / f"{name}.csv", index=False, lineterminator="\n")
    write_kv_plan(out / "kv_plan.json", res.plan)

    t1 = time.perf_counter()
    held = load_long_context(model, KINDS, (args.length,), "heldout", args.n)
    n_kv = len(res.kv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_hf(model, tmp / "hf")
        write_prompts(held, tmp / "prompts.jsonl")
        configs = {"full": "full"}
        for c in COMPRESSIONS:
            k = n_streaming(n_kv, full_fraction_for_compression(c, args.length, args.sink, args.window))
            for method, order in (("headlens", res.orders["headlens"]), ("random", res.orders[("random", 0)])):
                path = tmp / f"{method}{int(100 * c)}.json"
                write_kv_plan(path, kv_plan_record(model, as_layers(order[:k]), args.sink, args.window, method))
                configs[f"duo-{method}-{int(100 * c)}"] = f"duo:{path}"
            for press in PRESSES:
                configs[f"{press}-{int(100 * c)}"] = f"{press}:{c}"
        kv = run_kvpress(tmp / "hf", tmp / "prompts.jsonl", configs, tmp / "kvpress.jsonl", check_first=False)
    kv.to_csv(out / "kvpress.csv", index=False, lineterminator="\n")
    timings["kvpress"] = time.perf_counter() - t1
    timings["total_wall"] = time.perf_counter() - t0
    timings["total_cpu"] = cpu_seconds() - c0
    timings["load_average"] = os.getloadavg()[0]
    (out / "timings.json").write_text(json.dumps(dict(timings, config=res.config), indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--n", type=int, default=3, help="examples per kind and split")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.render_only:
        compute(args)
    from longcontext_render import render

    render(args.out, markdown)


if __name__ == "__main__":
    main()

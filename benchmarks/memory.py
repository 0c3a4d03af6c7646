"""Peak memory of capturing every pattern vs streaming statistics, one fresh subprocess per
setting (``bench.py --memory-child KIND N`` runs :func:`memory_child`)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import DTYPES, SIZES, build, tokenizer

from headlens.patterns.capture import capture_patterns, iter_patterns, stream_head_stats

BENCH = Path(__file__).resolve().parent / "bench.py"


def rss_kb(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in kB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(kind: str, n_seqs: int, args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    B, P, _ = SIZES["quick" if args.quick else device]["memory"]
    _, hl, _ = build("small_4l", tokenizer(), dtype, device, with_bridge=False)
    V = hl.cfg.vocab_size

    def sequences(n):  # generated lazily: the dataset itself is never held in memory
        gen = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield torch.randint(1000, V, (P,), generator=gen).tolist()

    def entropy(pb):  # per example and head: summed entropy over real queries, and their count
        a = pb.patterns.clamp_min(1e-12)
        return -(a * a.log()).sum(-1).sum(-1), pb.query_mask.sum(-1)

    next(iter_patterns(hl, sequences(B), B))  # warm-up: allocator and kernels settle
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_peak_rss()
    base_rss = rss_kb("VmRSS")
    start = time.perf_counter()
    if kind == "capture":
        kept = capture_patterns(hl, sequences(n_seqs), batch_size=B)
    else:
        kept = stream_head_stats(hl, sequences(n_seqs), {"entropy": entropy}, batch_size=B)
    seconds = time.perf_counter() - start
    peak_rss = rss_kb("VmHWM")
    res = {"kind": kind, "n_seqs": n_seqs, "batch": B, "positions": P, "seconds": seconds,
           "peak_rss_mb": peak_rss / 1024, "growth_over_baseline_mb": (peak_rss - base_rss) / 1024}
    if device == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_growth_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del kept
    return res


def bench_memory(args) -> list:
    _, _, counts = SIZES["quick" if args.quick else args.device]["memory"]
    rows = []
    for kind in ("capture", "stream"):
        for n in counts:
            cmd = [sys.executable, str(BENCH), "--memory-child", kind, str(n), "--device", args.device,
                   "--dtype", args.dtype, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            print(f"[memory] {kind} over {n} sequences", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows

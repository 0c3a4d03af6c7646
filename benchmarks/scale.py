"""The benchmark rows at scale (``bench.py --rows long_context,distributed,gpu``).

- ``long_context``: SmolLM2 on one sequence of real prose (Python's docs) at 1k and 4k tokens
  (8k too on CUDA), each setting in a fresh subprocess: the hook-free forward (sdpa in every
  layer), the same forward with every layer explicit (``set_attn_implementation("eager")``: what
  every forward ran before) and a forward that reads every layer's pattern (a hook per layer
  reducing it to each head's attention to the first token, as the long-context scores do). All
  without the unembedding (``return_type=None``), so that the peak is the attention's. Peak memory
  as in ``memory.py`` (peak RSS growth; on CUDA ``max_memory_allocated``).
- ``distributed``: the fast zero-ablation sweep of the 4-layer model over 64 examples, under
  ``torchrun`` on 1 and 2 gloo processes of one thread each (loopback), and on one process of two
  threads; the time of the sweep inside the job (after a barrier) and of the whole command, and
  the largest gap between the importances.
- ``gpu``: a 24-layer, d_model 1024 random GPT-2 (GPT-2 medium's shape): headlens' forward
  against ``transformers`` with sdpa (and eager), and the fast sweep against a TransformerLens
  bridge loop (one ``run_with_hooks`` per head and batch), over 1000 examples. Meant for
  ``--device cuda``; ``--quick`` runs it on tiny sizes anywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import DTYPES, build, median, prose_ids, race, sync, tokenizer
from memory import reset_peak_rss, rss_kb

BENCH = Path(__file__).resolve().parent / "bench.py"
LONG_KINDS = ("sdpa", "eager", "read_patterns")
LENGTHS = {"cpu": (1024, 4096), "cuda": (1024, 4096, 8192), "quick": (128, 256)}
GPU_SIZES = {"full": dict(shape="gpt2_medium_shape", examples=1000, positions=64, batch=100),
             "quick": dict(shape="small_4l", examples=8, positions=8, batch=4)}
DIST = {"full": dict(examples=64, positions=32), "quick": dict(examples=4, positions=8)}


# --- long context ---------------------------------------------------------------------------------
def long_model(args):
    """SmolLM2 (a tiny random LLaMA with ``--quick``) and ``[1, P]`` prose ids for any P."""
    from pydoc_data.topics import topics

    import headlens

    dtype = DTYPES[args.dtype]
    if args.quick:
        cfg = headlens.ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, n_ctx=8192,
                                   vocab_size=30522, d_mlp=128, positional="rotary", norm="rmsnorm", mlp="swiglu",
                                   family="llama")
        model = headlens.HeadlensModel(cfg).init_weights(seed=0).eval().to(device=args.device, dtype=dtype)
        tok = tokenizer()
    else:
        model = headlens.load("smollm2", dtype=dtype, device=args.device)
        tok = model.tokenizer
    text = " ".join(topics[k] for k in sorted(topics))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    return model, ids


def long_child(kind: str, P: int, args) -> dict:
    """One long-context setting in this (fresh) process: ``kind`` of :data:`LONG_KINDS` at ``P``."""
    model, all_ids = long_model(args)
    ids = all_ids[:P][None].to(args.device)
    L = model.cfg.n_layers
    sinks = {}
    hooks = [(f"blocks.{layer}.attn.hook_pattern",
              lambda t, hook, layer=layer: sinks.__setitem__(layer, t[..., 0].float().mean((0, 2))))
             for layer in range(L)] if kind == "read_patterns" else []
    model.set_attn_implementation("eager" if kind == "eager" else "sdpa")

    def run():
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(ids, return_type=None)

    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(ids[:, :64], return_type=None)  # warm-up: allocator and kernels settle
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_peak_rss()
    base_rss = rss_kb("VmRSS")
    times = []
    for _ in range(args.long_repeats or (2 if P >= 4096 else 3)):
        sync(args.device)
        start = time.perf_counter()
        run()
        sync(args.device)
        times.append(time.perf_counter() - start)
    peak = rss_kb("VmHWM")
    H = model.cfg.n_heads
    res = {"kind": kind, "positions": P, "times_s": times, "median_s": median(times),
           "peak_rss_mb": peak / 1024, "growth_mb": (peak - base_rss) / 1024,
           "pattern_mb": H * P * P * torch.finfo(DTYPES[args.dtype]).bits / 8 / 2**20,
           "patterns_read": len(sinks)}
    if args.device == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_growth_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


def bench_long_context(args) -> list:
    rows = []
    for P in LENGTHS["quick" if args.quick else args.device]:
        for kind in args.long_kinds.split(","):
            cmd = [sys.executable, str(BENCH), "--long-child", kind, str(P), "--device", args.device,
                   "--dtype", args.dtype, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            print(f"[long context] {kind} at {P} tokens", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['median_s']:.2f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    return rows


# --- distributed ----------------------------------------------------------------------------------
def dist_child(out: str, args) -> None:
    """Under torchrun (or alone): the fast zero sweep of the 4-layer model; rank 0 writes ``out``."""
    from bench import headlens_sweep, lm_task

    from headlens.runtime import from_torchrun

    sizes = DIST["quick" if args.quick else "full"]
    tok = tokenizer()
    _, hl, _ = build("small_4l", tok, DTYPES[args.dtype], "cpu", with_bridge=False)
    ids = prose_ids(tok, sizes["examples"], sizes["positions"])
    task = lm_task(ids)
    with from_torchrun() as world:
        world.barrier()
        start = time.perf_counter()
        importance = headlens_sweep(hl, task, "zero", batch_size=8)
        world.barrier()
        seconds = time.perf_counter() - start
        if world.is_main:
            Path(out).write_text(json.dumps({"processes": world.size, "threads": torch.get_num_threads(),
                                             "sweep_s": seconds, "importance": importance.tolist()}))


def bench_distributed(args) -> list:
    rows = []
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=os.pathsep.join(sys.path))
    with tempfile.TemporaryDirectory() as tmp:
        for procs, threads in ((1, 1), (2, 1), (1, 2)):
            out = Path(tmp) / f"{procs}x{threads}.json"
            child = [str(BENCH), "--dist-child", str(out), "--threads", str(threads), "--dtype", args.dtype] + \
                (["--quick"] if args.quick else [])
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
            cmd = launcher + child if procs > 1 else [sys.executable] + child
            print(f"[distributed] {procs} process(es) x {threads} thread(s)", flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS=str(threads)))
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            rows.append(dict(json.loads(out.read_text()), command_s=wall, launcher="torchrun" if procs > 1 else "python"))
    ref = torch.tensor(rows[0]["importance"])
    for r in rows:
        r["max_diff_vs_one_process"] = (torch.tensor(r.pop("importance")) - ref).abs().max().item()
    return rows


# --- GPU rows -------------------------------------------------------------------------------------
def tl_sweep_batched(bridge, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The TransformerLens loop over many examples: per head, one ``run_with_hooks`` per batch
    zeroing the head's ``hook_z``. ``[L, H]`` mean loss change over the examples."""
    from bench import lm_loss_per_example

    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    chunks = ids.split(batch)
    clean = torch.cat([lm_loss_per_example(bridge(c), c) for c in chunks])
    out = torch.zeros(L, H, dtype=torch.float64)
    for layer in range(L):
        for h in range(H):
            def ablate(z, hook, h=h):
                z[:, :, h] = 0.0
                return z
            losses = [lm_loss_per_example(bridge.run_with_hooks(c, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)]),
                                          c) for c in chunks]
            out[layer, h] = (torch.cat(losses) - clean).mean().item()
    return out


def bench_gpu(args) -> dict:
    """headlens' forward vs transformers sdpa / eager, and the fast sweep vs the bridge loop, on the
    24-layer model (``--quick``: the 4-layer one on tiny sizes)."""
    from bench import headlens_sweep, lm_task
    from transformers import GPT2LMHeadModel

    s = GPU_SIZES["quick" if args.quick else "full"]
    device, dtype = args.device, DTYPES[args.dtype]
    tok = tokenizer()
    hf, hl, bridge = build(s["shape"], tok, dtype, device)
    hf_sdpa = GPT2LMHeadModel._from_config(hf.config, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
    hf_sdpa.load_state_dict(hf.state_dict())
    ids = prose_ids(tok, s["examples"], s["positions"]).to(device)
    B = s["batch"]
    chunks = ids.split(B)
    with torch.no_grad():
        ref = hf_sdpa(input_ids=chunks[0]).logits
        diff = {"headlens": (hl(chunks[0]) - ref).abs().max().item(),
                "transformers_eager": (hf(input_ids=chunks[0]).logits - ref).abs().max().item()}
    repeats = 2 if args.quick else 10
    t = race({"forward/headlens": lambda: hl(chunks[0]),
              "forward/transformers_sdpa": lambda: hf_sdpa(input_ids=chunks[0]).logits,
              "forward/transformers_eager": lambda: hf(input_ids=chunks[0]).logits}, repeats, device)
    results = {}
    task = lm_task(ids)
    t.update(race({"sweep_zero/headlens": lambda: results.__setitem__("hl", headlens_sweep(hl, task, "zero", B)),
                   "sweep_zero/bridge_loop": lambda: results.__setitem__("tl", tl_sweep_batched(bridge, ids, B))},
                  1, device, warmup=0))
    med = {k: median(v) for k, v in t.items()}
    c = hl.cfg
    return {"config": {k: getattr(c, k) for k in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "vocab_size")},
            "examples": s["examples"], "positions": s["positions"], "batch": B, "max_logit_diff_vs_sdpa": diff,
            "times_s": t, "median_s": med,
            "sweep_max_diff": (results["hl"] - results["tl"]).abs().max().item(),
            "ratios": {"forward headlens / transformers sdpa": med["forward/headlens"] / med["forward/transformers_sdpa"],
                       "forward headlens / transformers eager":
                           med["forward/headlens"] / med["forward/transformers_eager"],
                       "sweep bridge loop / headlens": med["sweep_zero/bridge_loop"] / med["sweep_zero/headlens"]}}


def scale_targets(res: dict) -> list:
    """The issue's targets for the rows at scale: ``(name, value, op, target)``."""
    rows = []
    long = {(r["kind"], r["positions"]): r for r in res.get("long_context", [])}
    for P in sorted({p for _, p in long}):
        fast, read = long.get(("sdpa", P)), long.get(("read_patterns", P))
        if fast and read:
            key = "cuda_peak_mb" if "cuda_peak_mb" in fast else "peak_rss_mb"
            rows += [(f"forward without / with pattern capture at {P} tokens, time", fast["median_s"] / read["median_s"],
                      "<", 1.0),
                     (f"forward without / with pattern capture at {P} tokens, peak memory ({key})",
                      fast[key] / read[key], "<", 1.0)]
    dist = {(r["processes"], r["threads"]): r for r in res.get("distributed", [])}
    if (1, 1) in dist and (2, 1) in dist:
        rows += [("distributed sweep speed-up, 2 gloo processes over 1 (1 thread each)",
                  dist[(1, 1)]["sweep_s"] / dist[(2, 1)]["sweep_s"], ">", 1.0),
                 ("distributed sweep, max |2 processes - 1 process| importance",
                  dist[(2, 1)]["max_diff_vs_one_process"], "<=", 1e-5)]
    if "gpu" in res and res["meta"]["device"] == "cuda":
        rows.append(("sweep speed-up over the bridge loop (24 layers, GPU)",
                     res["gpu"]["ratios"]["sweep bridge loop / headlens"], ">=", 5.0))
    return rows


def print_scale(res: dict) -> None:
    if res.get("long_context"):
        print(f"\n{'long context':<16}{'tokens':>7}{'median s':>10}{'peak RSS MB':>13}{'growth MB':>11}"
              f"{'one pattern MB':>16}" + (f"{'CUDA peak MB':>14}" if "cuda_peak_mb" in res["long_context"][0] else ""))
        for r in res["long_context"]:
            print(f"{r['kind']:<16}{r['positions']:>7}{r['median_s']:>10.2f}{r['peak_rss_mb']:>13.1f}{r['growth_mb']:>11.1f}"
                  f"{r['pattern_mb']:>16.1f}" + (f"{r['cuda_peak_mb']:>14.1f}" if "cuda_peak_mb" in r else ""))
    if res.get("distributed"):
        one = res["distributed"][0]["sweep_s"]
        print(f"\n{'distributed sweep':<28}{'sweep s':>9}{'command s':>11}{'speed-up':>10}{'max diff':>10}")
        for r in res["distributed"]:
            print(f"{str(r['processes']) + ' proc x ' + str(r['threads']) + ' thread':<28}{r['sweep_s']:>9.2f}"
                  f"{r['command_s']:>11.2f}{one / r['sweep_s']:>10.2f}{r['max_diff_vs_one_process']:>10.1e}")
    if res.get("gpu"):
        g = res["gpu"]
        print(f"\n== gpu rows: {g['config']}, {g['examples']} examples x {g['positions']} positions, batch {g['batch']}")
        for k, v in g["median_s"].items():
            print(f"  {k:<40}{v:>10.4f} s")
        for k, v in g["ratios"].items():
            print(f"  {k:<40}{v:>10.3f}")
        print(f"  {'sweep max |headlens - bridge|':<40}{g['sweep_max_diff']:>10.1e}")

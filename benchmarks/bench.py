"""headlens against TransformerLens' TransformerBridge and ``transformers``, in one run.

Same random GPT-2-shaped weights (one ``transformers`` model; the bridge wraps a deep copy because
booting rewires the model it is given), same token ids, same thread count, same dtype. Timings are
medians over ``--repeats`` runs taken round-robin (A, B, C, A, B, C, ...) so that load from other
processes hits every contender alike.

    python benchmarks/bench.py                                # CPU fp32, < 10 min on 2 cores
    python benchmarks/bench.py --device cuda --dtype bf16     # one GPU, < 5 min
    python benchmarks/bench.py --quick                        # tiny sizes: checks the code paths
    python benchmarks/bench.py --rows long_context,distributed   # the CPU rows at scale (scale.py)
    python benchmarks/bench.py --device cuda --rows long_context,gpu --dtype bf16   # the GPU rows

Set-up and timing live in ``harness.py``, FLOP counts and the matrix-multiply peak in
``flops.py``, the memory runs in ``memory.py``. Writes ``benchmarks/results/{device}[-{dtype}].json``
(``--out`` to change); ``--profile`` only
profiles one zero-ablation sweep each way (torch.profiler) into ``results/profile-{device}.txt``.
FLOPs are counted analytically from the config (matrix multiplies only: Q/K/V/O projections,
QK^T, AV, MLP, unembedding) and checked against torch's FlopCounterMode on the small model. The
matrix-multiply peak is the best median GFLOP/s of square multiplies in the same dtype and thread
count. Peak memory is measured in a fresh subprocess per setting, after the model is built and one
batch has run: on CPU the kernel's peak resident set (``VmHWM`` in /proc/self/status, reset
through /proc/self/clear_refs just before the run) and its growth over the resident set at that
moment (``VmRSS``); on CUDA also ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from flops import counted_flops, forward_flops, matmul_peak, sweep_flops
from harness import DTYPES, RESULTS, SHAPES, SIZES, TOLERANCE, build, median, prose_ids, race, sync, tokenizer
from memory import bench_memory, memory_child
from scale import bench_distributed, bench_gpu, bench_long_context, dist_child, long_child, print_scale, scale_targets

from headlens.importance.gradients import gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.patterns.capture import capture_patterns


# --- the contenders -------------------------------------------------------------------------
def lm_loss_per_example(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, P, V]`` logits -> mean next-token cross-entropy per sequence ``[B]`` (float64)."""
    B, P, V = logits.shape
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(B, P - 1).mean(1).double()


def tl_sweep(bridge, ids: torch.Tensor, kind: str) -> torch.Tensor:
    """What a TransformerLens user writes: one ``run_with_hooks`` per head, zeroing (or
    mean-replacing) that head's ``hook_z``. Returns ``[L, H]`` mean-loss change vs clean."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    with torch.no_grad():
        clean = lm_loss_per_example(bridge(ids), ids).mean()
        means = {}
        if kind == "mean":  # each head's z averaged over the examples, per position
            names = {f"blocks.{layer}.attn.hook_z" for layer in range(L)}
            _, cache = bridge.run_with_cache(ids, return_type=None, names_filter=lambda n: n in names)
            means = {layer: cache[f"blocks.{layer}.attn.hook_z"].mean(0) for layer in range(L)}  # [P, H, d]
        out = torch.zeros(L, H, dtype=torch.float64)
        for layer in range(L):
            name = f"blocks.{layer}.attn.hook_z"
            for h in range(H):
                def ablate(z, hook, layer=layer, h=h):
                    z[:, :, h] = means[layer][:, h] if kind == "mean" else 0.0
                    return z
                logits = bridge.run_with_hooks(ids, fwd_hooks=[(name, ablate)])
                out[layer, h] = (lm_loss_per_example(logits, ids).mean() - clean).item()
    return out


def tl_gradients(bridge, ids: torch.Tensor) -> torch.Tensor:
    """Michel et al. with TransformerLens: a gate per example on every ``hook_z``, one backward;
    ``[L, H]`` = mean over examples of |dL(x)/dg| with L(x) each sequence's mean loss."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    gate = torch.ones(ids.shape[0], L, H, device=ids.device, requires_grad=True)
    hooks = [(f"blocks.{layer}.attn.hook_z",
              lambda z, hook, layer=layer: z * gate[:, layer][:, None, :, None].to(z.dtype)) for layer in range(L)]
    with torch.enable_grad():
        logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)
        (grad,) = torch.autograd.grad(lm_loss_per_example(logits, ids).sum(), gate)
    return grad.abs().double().cpu().sum(0) / ids.shape[0]


def lm_task(ids: torch.Tensor):
    """headlens' next-token-loss task over the same token ids (one example per row)."""
    return LMLossTask([row.tolist() for row in ids.cpu()], name="bench", max_tokens=ids.shape[1])


def headlens_sweep(hl, task, kind: str, batch_size: int) -> torch.Tensor:
    """headlens' fast exact sweep as an ``[L, H]`` tensor of importances (mean metric change)."""
    table = ablation_sweep(hl, task, ablation=kind, method="fast", batch_size=batch_size, progress=False)
    return torch.tensor(table["importance"].to_numpy()).view(hl.cfg.n_layers, hl.cfg.n_heads)


# --- one model ------------------------------------------------------------------------------
def bench_model(shape: str, tok, args, sizes) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    B, P = sizes[shape]
    hf, hl, bridge = build(shape, tok, dtype, device)
    ids = prose_ids(tok, B, P).to(device)
    pattern_names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(hl.cfg.n_layers)}
    out = {"batch": B, "positions": P, "config": {k: getattr(hl.cfg, k) for k in
           ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "vocab_size")}}
    t0 = time.time()
    log = (lambda *a: print(f"[{shape} {time.time() - t0:6.1f}s]", *a, flush=True))

    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out["max_logit_diff"] = {"headlens": (hl(ids) - ref).abs().max().item(),
                                 "bridge": (bridge(ids) - ref).abs().max().item()}
    log("forward and capture")
    t = race({
        "forward/transformers": lambda: hf(input_ids=ids).logits,
        "forward/headlens": lambda: hl(ids),
        "forward/bridge": lambda: bridge(ids),
        "forward_no_unembed/headlens": lambda: hl(ids, return_type=None),
        "forward_no_unembed/bridge": lambda: bridge(ids, return_type=None),
        "capture/headlens": lambda: capture_patterns(hl, ids, batch_size=B),
        "capture/bridge": lambda: bridge.run_with_cache(ids, return_type=None,
                                                        names_filter=lambda n: n in pattern_names),
    }, args.repeats, device)

    task = lm_task(ids)
    results = {}

    def keep(key, fn):  # time fn, keep its last result
        return lambda: results.__setitem__(key, fn())

    for kind in ("zero", "mean"):
        log(f"{kind}-ablation sweep over {hl.cfg.n_layers * hl.cfg.n_heads} heads")
        t.update(race({
            f"sweep_{kind}/bridge_loop": keep(("tl", kind), lambda kind=kind: tl_sweep(bridge, ids, kind)),
            f"sweep_{kind}/headlens": keep(("hl", kind), lambda kind=kind: headlens_sweep(hl, task, kind, B)),
        }, args.sweep_repeats, device, warmup=0))
        out[f"sweep_{kind}_max_diff"] = (results[("hl", kind)] - results[("tl", kind)]).abs().max().item()
    out["sweep_zero_importance_bridge"] = results[("tl", "zero")].tolist()

    log("gradient importance")
    t.update(race({
        "gradient/headlens": keep("hl_grad", lambda: gradient_importance(hl, task, batch_size=B)),
        "gradient/bridge": keep("tl_grad", lambda: tl_gradients(bridge, ids)),
        "forward/headlens_again": lambda: hl(ids),
    }, args.repeats, device))
    raw = torch.tensor(results["hl_grad"]["grad_importance_raw"].to_numpy()).view_as(results["tl_grad"])
    out["gradient_max_rel_diff"] = ((raw - results["tl_grad"]).abs().max() / results["tl_grad"].abs().max()).item()

    out["times_s"] = {k: v for k, v in t.items()}
    out["median_s"] = {k: median(v) for k, v in t.items()}
    out["flops"] = {"forward": forward_flops(hl, B, P, lm_loss=False),
                    **{f"sweep_{k}": sweep_flops(hl, B, P, k) for k in ("zero", "mean")}}
    if args.count_flops == shape or args.quick:  # check the analytic counts against what runs
        log("counting FLOPs")
        with torch.no_grad():
            out["flops_counted"] = {"forward": counted_flops(lambda: hf(input_ids=ids))}
            for kind in ("zero", "mean"):
                out["flops_counted"][f"sweep_{kind}"] = {
                    "transformer_lens_loop": counted_flops(lambda: tl_sweep(bridge, ids, kind)),
                    "headlens_fast": counted_flops(lambda: headlens_sweep(hl, task, kind, B))}
    return out


def ratios(m: dict, peak: float) -> dict:
    s, r = m["median_s"], {}
    r["forward headlens / transformers"] = s["forward/headlens"] / s["forward/transformers"]
    r["forward bridge / transformers"] = s["forward/bridge"] / s["forward/transformers"]
    r["capture / own forward (headlens)"] = s["capture/headlens"] / s["forward_no_unembed/headlens"]
    r["capture / own forward (bridge)"] = s["capture/bridge"] / s["forward_no_unembed/bridge"]
    r["capture bridge / headlens"] = s["capture/bridge"] / s["capture/headlens"]
    for kind in ("zero", "mean"):
        f = m["flops"][f"sweep_{kind}"]
        r[f"sweep {kind}: bridge loop / headlens"] = s[f"sweep_{kind}/bridge_loop"] / s[f"sweep_{kind}/headlens"]
        r[f"sweep {kind}: FLOP ratio loop / headlens (= speed-up at equal GFLOP/s)"] = \
            f["transformer_lens_loop"] / f["headlens_fast"]
        gf = f["headlens_fast"] / s[f"sweep_{kind}/headlens"] / 1e9
        r[f"sweep {kind}: headlens GFLOP/s"] = gf
        r[f"sweep {kind}: headlens fraction of matmul peak"] = gf / peak
        gf = f["transformer_lens_loop"] / s[f"sweep_{kind}/bridge_loop"] / 1e9
        r[f"sweep {kind}: bridge loop GFLOP/s"] = gf
        r[f"sweep {kind}: bridge loop fraction of matmul peak"] = gf / peak
    r["gradient importance / forward (headlens)"] = s["gradient/headlens"] / s["forward/headlens_again"]
    r["gradient bridge / headlens"] = s["gradient/bridge"] / s["gradient/headlens"]
    return r


# --- report ---------------------------------------------------------------------------------
ROWS = [  # (row label, headlens key, transformers key, bridge key)
    ("forward, logits", "forward/headlens", "forward/transformers", "forward/bridge"),
    ("forward, no unembedding", "forward_no_unembed/headlens", None, "forward_no_unembed/bridge"),
    ("capture all patterns", "capture/headlens", None, "capture/bridge"),
    ("zero-ablation sweep, all heads", "sweep_zero/headlens", None, "sweep_zero/bridge_loop"),
    ("mean-ablation sweep, all heads", "sweep_mean/headlens", None, "sweep_mean/bridge_loop"),
    ("gradient importance, all heads", "gradient/headlens", None, "gradient/bridge"),
]


def print_table(res: dict) -> None:
    cell = (lambda s, k: f"{s[k]:>13.4f}" if k in s else f"{'-':>13}")
    for shape, m in res["models"].items():
        c, s = m["config"], m["median_s"]
        print(f"\n== {shape}: {c['n_layers']} layers x {c['n_heads']} heads, d_model {c['d_model']}, "
              f"vocab {c['vocab_size']}; batch {m['batch']} x {m['positions']} positions; median seconds")
        print(f"{'':<32}{'headlens':>13}{'transformers':>13}{'bridge':>13}{'bridge/hl':>11}")
        for label, hl, hf, br in ROWS:
            ratio = f"{s[br] / s[hl]:>11.2f}" if hl in s and br in s else f"{'-':>11}"
            print(f"{label:<32}{cell(s, hl)}{cell(s, hf) if hf else f'{chr(45):>13}'}{cell(s, br)}{ratio}")
        for name, value in m["ratios"].items():
            print(f"  {name:<70}{value:>9.3f}")
        for kind in ("zero", "mean"):
            print(f"  {'sweep ' + kind + ': max |headlens - bridge| over heads':<70}{m[f'sweep_{kind}_max_diff']:>9.1e}")
        print(f"  {'gradient: max |headlens - bridge| / max |bridge|':<70}{m['gradient_max_rel_diff']:>9.1e}")
        if "flops_counted" in m:
            fc, fa = m["flops_counted"], m["flops"]
            worst = max(abs(fc[k][w] / fa[k][w] - 1) for k in ("sweep_zero", "sweep_mean") for w in fa[k])
            print(f"  {'analytic vs counted sweep FLOPs (FlopCounterMode): worst relative gap':<70}{worst:>9.1e}")
    mp = res["matmul_peak"]
    print(f"\nmatmul peak: {mp['gflops']:.1f} GFLOP/s ({res['meta']['dtype']}, {res['meta']['threads']} threads; "
          f"best of {mp['before']['gflops']:.1f} before and {mp['after']['gflops']:.1f} after the models)")
    if res.get("memory"):
        print(f"\n{'memory':<10}{'sequences':>10}{'peak RSS MB':>13}{'growth MB':>11}{'seconds':>9}"
              + (f"{'CUDA peak MB':>14}" if "cuda_peak_mb" in res["memory"][0] else ""))
        for r in res["memory"]:
            print(f"{r['kind']:<10}{r['n_seqs']:>10}{r['peak_rss_mb']:>13.1f}{r['growth_over_baseline_mb']:>11.1f}"
                  f"{r['seconds']:>9.1f}" + (f"{r['cuda_peak_mb']:>14.1f}" if "cuda_peak_mb" in r else ""))


def targets(res: dict) -> list:
    """The issue's targets, from the 12-layer model's ratios, the memory runs and the rows at scale."""
    rows = scale_targets(res)
    if "gpt2_small_shape" in res.get("models", {}):
        rows += model_targets(res)
    ok = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}
    return [{"name": n, "value": v, "target": f"{op} {t}", "met": bool(ok[op](v, t))} for n, v, op, t in rows]


def model_targets(res: dict) -> list:
    m = res["models"]["gpt2_small_shape"]
    r, tol = m["ratios"], TOLERANCE[DTYPES[res["meta"]["dtype"]]]
    rows = []
    for kind in ("zero", "mean"):
        rows += [(f"{kind}-ablation sweep speed-up over the bridge loop (12 layers)",
                  r[f"sweep {kind}: bridge loop / headlens"], ">=", 2.5),
                 (f"{kind}-ablation per-head agreement with the bridge loop", m[f"sweep_{kind}_max_diff"], "<=", tol)]
    rows += [("capture all patterns / headlens forward (no unembedding)", r["capture / own forward (headlens)"], "<=", 1.10),
             ("headlens forward / transformers eager", r["forward headlens / transformers"], "<=", 1.15),
             ("gradient importance / headlens forward", r["gradient importance / forward (headlens)"], "<=", 4.0)]
    stream = sorted((x for x in res.get("memory", []) if x["kind"] == "stream"), key=lambda x: x["n_seqs"])
    if len(stream) == 2:
        key = "cuda_peak_mb" if "cuda_peak_mb" in stream[0] else "peak_rss_mb"
        rows.append((f"streaming peak memory growth, {stream[0]['n_seqs']} -> {stream[1]['n_seqs']} sequences ({key})",
                     stream[1][key] / stream[0][key] - 1, "<", 0.10))
    return rows


def profile_sweeps(args) -> None:
    """torch.profiler over one zero-ablation sweep each way (12-layer model): top operators."""
    from torch.profiler import ProfilerActivity, profile

    device = args.device
    B, P = SIZES["quick" if args.quick else device]["gpt2_small_shape"]
    tok = tokenizer()
    _, hl, bridge = build("gpt2_small_shape", tok, DTYPES[args.dtype], device)
    ids = prose_ids(tok, B, P).to(device)
    task = lm_task(ids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    lines = [f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, batch {B} x {P}"]
    for name, fn in (("headlens fast zero sweep", lambda: headlens_sweep(hl, task, "zero", B)),
                     ("TransformerLens loop, zero", lambda: tl_sweep(bridge, ids, "zero"))):
        with torch.no_grad(), profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            sync(device)
            seconds = time.perf_counter() - start
        lines += [f"\n== {name}: {seconds:.2f} s", prof.key_averages().table(sort_by=sort, row_limit=20)]
    out = RESULTS / f"profile-{device}{'' if args.dtype == 'fp32' else '-' + args.dtype}.txt"
    out.write_text("\n".join(lines))
    print("\n".join(lines), f"\nwrote {out}", sep="\n")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=None, help="forward/capture/gradient repeats")
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--count-flops", default="small_4l", help="model whose sweeps are FLOP-counted too")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="only profile one zero sweep each way")
    p.add_argument("--rows", default="models,memory",
                   help="comma-separated: models, memory (the default) and the rows at scale of scale.py: "
                        "long_context, distributed, gpu")
    p.add_argument("--long-repeats", type=int, default=None, help="long-context repeats (default 3; 2 at 4k+)")
    p.add_argument("--long-kinds", default="sdpa,eager,read_patterns", help="long-context settings to run")
    p.add_argument("--memory-child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--long-child", nargs=2, metavar=("KIND", "P"), help=argparse.SUPPRESS)
    p.add_argument("--dist-child", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    rows = set(args.rows.split(","))
    unknown = rows - {"models", "memory", "long_context", "distributed", "gpu"}
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), args)))
        return
    if args.long_child:
        print(json.dumps(long_child(args.long_child[0], int(args.long_child[1]), args)))
        return
    if args.dist_child:
        return dist_child(args.dist_child, args)
    if args.profile:
        return profile_sweeps(args)
    args.repeats = args.repeats or (2 if args.quick else 7 if args.device == "cpu" else 20)
    if args.quick:
        args.sweep_repeats = 1
    sizes = SIZES["quick" if args.quick else args.device]
    from importlib.metadata import version

    load_before = os.getloadavg()
    start = time.time()
    res = {"meta": {
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        **{name: version(name) for name in ("torch", "transformers", "transformer-lens")},
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_before": load_before, "repeats": args.repeats, "sweep_repeats": args.sweep_repeats,
        "quick": args.quick, "rows": sorted(rows)}}
    if "models" in rows:
        peaks = [matmul_peak(DTYPES[args.dtype], args.device, quick=args.quick)]
        tok = tokenizer()
        res["models"] = {shape: bench_model(shape, tok, args, sizes) for shape in args.models.split(",")}
        peaks.append(matmul_peak(DTYPES[args.dtype], args.device, quick=args.quick))  # the load may have changed
        res["matmul_peak"] = {"gflops": max(p["gflops"] for p in peaks), "before": peaks[0], "after": peaks[1]}
        for m in res["models"].values():
            m["ratios"] = ratios(m, res["matmul_peak"]["gflops"])
    if "memory" in rows and not args.no_memory:
        res["memory"] = bench_memory(args)
    if "long_context" in rows:
        res["long_context"] = bench_long_context(args)
    if "distributed" in rows:
        res["distributed"] = bench_distributed(args)
    if "gpu" in rows:
        res["gpu"] = bench_gpu(args)
    res["meta"]["loadavg_after"] = os.getloadavg()
    res["meta"]["wall_s"] = time.time() - start
    res["targets"] = targets(res)
    if "models" in rows:
        print_table(res)
    print_scale(res)
    print("\ntargets:")
    for t in res["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['name']}: {t['value']:.4g} (target {t['target']})")
    print(f"\nwall time {res['meta']['wall_s']:.0f} s; load average before {load_before}, "
          f"after {res['meta']['loadavg_after']}")
    suffix = "" if args.dtype == "fp32" and args.device == "cpu" else f"-{args.dtype}"
    scale = "" if "models" in rows else "-scale"
    out = Path(args.out) if args.out else RESULTS / f"{args.device}{scale}{suffix}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

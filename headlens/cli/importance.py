"""``headlens importance``: every head's ablation importance with bootstrap CIs, Michel et al.
gradient importance and attribution patching, in one table."""
from __future__ import annotations

import os
import time

DISTRIBUTED = True  # shares its work over the ranks of a torchrun job (see headlens.cli.app)
NAME = "importance"
HELP = "ablation sweep (with CIs), gradient importance and attribution patching for every head"
DESCRIPTION = ("Ablate each head alone on a task (zero, mean, resample or uniform attention) and "
               "report the mean change of the task metric with a standard error and a bootstrap "
               "confidence interval over examples; add Michel et al.'s gradient importance and "
               "attribution patching with their Spearman rank correlation to the exact sweep. "
               "Tasks: a bundled name (paraphrase, ioi, text, lm, mlm, fidelity) or a .txt / .jsonl file.")


def add_arguments(parser) -> None:
    from headlens.cli.options import add_shared

    add_shared(parser, "--model", "--task", "--ablation", "--metric")
    parser.add_argument("--method", default="fast", choices=["fast", "naive"], help="sweep implementation")
    add_shared(parser, "--n-examples", "--batch-size")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    add_shared(parser, "--seed")
    parser.add_argument("--memory-budget-mb", type=float, default=512, help="memory for stacked ablations")
    parser.add_argument("--resume-dir", default=None, help="save finished heads here; re-running resumes")
    parser.add_argument("--no-gradients", action="store_true", help="skip gradient importance")
    parser.add_argument("--grad-absolute", default="example", choices=["example", "batch"],
                        help="gradient importance: |dL/dg| per example (Michel et al.) or per batch "
                             "(transformers' run_bertology.py)")
    parser.add_argument("--attribution", default=None, choices=["corrupted", "zero", "mean", "resample"],
                        help="also run attribution patching with this corruption")
    add_shared(parser, "--device", "--dtype", "--device-map", "--max-memory")
    parser.add_argument("--out", default=None, help="CSV file for the table (one row per head; an existing "
                                                    "file is replaced only with --overwrite)")
    add_shared(parser, "--overwrite", "--truncate", "--no-progress")


def load_model_and_task(args):
    """The model and task named on the command line (shared with ``headlens prune``)."""
    from headlens.importance.tasks import TEXT_TASKS, default_task_name, load_task
    from headlens.io.loading import load
    from headlens.runtime import current_world
    from headlens.runtime.devices import parse_device_map, parse_max_memory

    model = load(args.model, dtype=args.dtype, device=current_world().device(args.device),
                 device_map=parse_device_map(args.device_map), max_memory=parse_max_memory(args.max_memory))
    options = {}
    if args.metric in TEXT_TASKS:
        options["task_type"] = args.metric
    elif args.metric is not None:
        options["metric"] = args.metric
    task = load_task(args.task or default_task_name(model), model=model, n_examples=args.n_examples, **options)
    if getattr(args, "truncate", False) and task.max_tokens is None:
        task.max_tokens = model.cfg.n_ctx  # cut examples longer than the context (from the end)
    return model, task


def run(args) -> int:
    import pandas as pd

    from headlens.importance.gradients import attribution_patching, compare_with_ablation, gradient_importance
    from headlens.importance.sweep import ablation_sweep
    from headlens.io.digest import source_digest
    from headlens.model.heads import head_label
    from headlens.runtime import current_world

    start = time.perf_counter()
    if args.out:
        from headlens.errors import HeadlensError
        from headlens.files import writable_folder

        if os.path.isdir(args.out):
            raise HeadlensError(f"--out {args.out!r} is a folder, expected a CSV file name")
        if os.path.exists(args.out) and not args.overwrite:
            raise HeadlensError(f"--out {args.out!r} exists; choose another file name or pass --overwrite to "
                                "replace it")
        writable_folder(os.path.dirname(os.path.abspath(args.out)))  # fail now, not after the sweep
    model, task = load_model_and_task(args)
    progress = not args.no_progress
    print(f"model {model.cfg.name}: {model.cfg.n_layers} layers, {model.cfg.n_heads_total} heads; "
          f"task {task.name} ({len(task)} examples, metric {task.metric_name}, "
          f"{'higher' if task.higher_is_better else 'lower'} is better)")
    timings = {}
    t = time.perf_counter()
    sweep = ablation_sweep(model, task, ablation=args.ablation, method=args.method, n_bootstrap=args.n_bootstrap,
                           seed=args.seed, resume_dir=args.resume_dir, batch_size=args.batch_size,
                           memory_budget_mb=args.memory_budget_mb, progress=progress,
                           weights_key=source_digest(args.model, args.dtype) if args.resume_dir else None)
    timings["sweep"] = time.perf_counter() - t
    estimates = []
    if not args.no_gradients:
        t = time.perf_counter()
        estimates.append(gradient_importance(model, task, batch_size=args.batch_size, absolute=args.grad_absolute,
                                             progress=progress))
        timings["gradients"] = time.perf_counter() - t
    if args.attribution:
        t = time.perf_counter()
        estimates.append(attribution_patching(model, task, corruption=args.attribution, seed=args.seed,
                                              batch_size=args.batch_size, progress=progress))
        timings["attribution"] = time.perf_counter() - t
    table = compare_with_ablation(sweep, *estimates) if estimates else sweep
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 1000):
        shown = [c for c in table.columns if c not in ("metric_clean", "n_examples", "grad_importance_raw")]
        print(table[shown].round(4).to_string(index=False))
    print(f"\nclean {task.metric_name}: {sweep['metric_clean'].iloc[0]:.4f}; importance = metric(ablated) - "
          "metric(clean), 95% bootstrap CI; damage > 0 means ablating the head hurts; p_value: paired t-test, "
          "q_value: Benjamini-Hochberg over the heads, p_holm: Holm")
    needed = int(((sweep.q_value < 0.05) & (sweep.damage > 0)).sum())
    print(f"needed at a 5% false-discovery rate (q_value < 0.05, damage > 0): {needed} of {len(sweep)} heads")
    top = sweep.sort_values("damage", ascending=False).head(5)
    print("most important: " + ", ".join(f"{head_label(r.layer, r.head)} ({r.importance:+.3f} "
                                         f"[{r.importance_ci_low:+.3f}, {r.importance_ci_high:+.3f}])"
                                         for r in top.itertuples()))
    for col, rho in table.attrs.get("spearman", {}).items():
        print(f"Spearman rank correlation of {col} with the ablation sweep: {rho:.3f}")
    if args.out and current_world().is_main:  # rank 0 writes
        from headlens.files import atomic_write

        atomic_write(args.out, table.to_csv(index=False).encode())
        print(f"wrote {args.out}")
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
          + f", total {time.perf_counter() - start:.1f} s")
    return 0

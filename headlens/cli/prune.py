"""``headlens prune``: pruning curves (Michel et al. iterative, ablation order, random), a plan,
and optionally the physically pruned model with its parameter count and speed-up."""
from __future__ import annotations

import time

from headlens.cli.importance import load_model_and_task
from headlens.cli.options import add_shared
from headlens.cli.outputs import check_model_output, results_folder
from headlens.runtime import current_world

DISTRIBUTED = True  # shares its work over the ranks of a torchrun job (see headlens.cli.app)
NAME = "prune"
HELP = "pruning curves and a pruning plan; optionally save the physically pruned model"
DESCRIPTION = ("Order the heads for removal by Michel et al.'s iterative gradient importance, by the "
               "single-head ablation sweep, and at random (several seeds); choose plans on one split "
               "of the task and score them on the other. Writes pruning.csv and prune_plan.json, and "
               "with --save-model a model with the planned heads' weights removed. With --apply PLAN "
               "(a prune_plan.json written by 'headlens report' or 'headlens prune') it skips the "
               "analysis and only removes that plan's heads.")


def add_arguments(parser) -> None:
    add_shared(parser, "--model", "--task", "--metric")
    parser.add_argument("--methods", nargs="+", default=["michel", "ablation", "random"],
                        choices=["michel", "ablation", "random"], help="pruning orders to compare")
    parser.add_argument("--target", type=float, default=0.5, help="largest fraction of heads to remove")
    parser.add_argument("--floor", type=float, default=None,
                        help="keep at least this fraction of the unpruned metric (e.g. 0.9); default: prune to --target")
    parser.add_argument("--step", type=float, default=None,
                        help="fraction of all heads removed per step; default: one head at a time up to 32 heads, "
                             "else 10%%, with every head count evaluated where an order crosses --floor")
    parser.add_argument("--n-random", type=int, default=10,
                        help="random orders (seeds): their median and 90%% band are the baseline")
    parser.add_argument("--split", type=float, default=0.5, help="fraction of examples used to choose the plan")
    add_shared(parser, "--ablation")
    parser.add_argument("--apply", default=None, metavar="PLAN",
                        help="prune_plan.json to apply with --save-model (no analysis is run)")
    add_shared(parser, "--n-examples", "--batch-size", "--seed", "--device", "--dtype", "--device-map", "--max-memory")
    parser.add_argument("--out", default="headlens-prune", help="folder for pruning.csv and prune_plan.json")
    parser.add_argument("--save-model", default=None, help="folder for the physically pruned model (recommended plan)")
    parser.add_argument("--format", default="hf", choices=["hf", "hf-padded", "headlens"],
                        help="transformers-layout folder (headlens.io.to_hf.save_hf; hf-padded: full shape with "
                             "the removed heads zero, which transformers itself loads) or headlens checkpoint")
    add_shared(parser, "--overwrite", "--truncate", "--no-progress")


def run(args) -> int:
    from headlens.errors import check
    from headlens.io.digest import source_path
    from headlens.pruning.plans import read_plan

    start = time.perf_counter()
    if args.save_model:  # a file, a non-empty folder or the model's own folder fails now, not after the analysis
        check_model_output(args.save_model, args.overwrite, source_path(args.model), "--save-model")
    if args.apply is not None:
        check(args.save_model is not None, "--apply needs --save-model (the folder for the pruned model)")
        record = read_plan(args.apply)  # a malformed plan fails now, before the model loads
        model, task = load_model_and_task(args)
        plan = record["heads"]
    else:
        model, task, plan = _analyse(args)
    if args.save_model and current_world().is_main:
        _save_pruned(model, task, plan, args)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


def _analyse(args):
    """Pruning curves and the recommended plan, written to ``--out``; returns the model, task and plan."""
    import pandas as pd

    from headlens.pruning.curve import pruning_curve
    from headlens.pruning.plans import PLAN_FILE, plan_record, write_plan

    with results_folder(args.out, ["pruning.csv", PLAN_FILE]) as out:  # rank 0 writes
        model, task = load_model_and_task(args)
        result = pruning_curve(model, task, methods=args.methods, target=args.target, floor=args.floor,
                               step=args.step, n_random=args.n_random, split=args.split, seed=args.seed,
                               ablation=args.ablation, batch_size=args.batch_size, progress=not args.no_progress)
        curve = result.curve
        with pd.option_context("display.width", 200, "display.max_rows", 1000):
            print(curve.round(4).to_string(index=False))
        if out is None:
            return model, task, result.plan
        out.write("pruning.csv", curve.to_csv(index=False, lineterminator="\n").encode(), NAME)
        record = plan_record(result.plan, result.plans, result.recommended, model=model.cfg.name,
                             n_heads=model.cfg.n_heads_total, task=task.name, metric=task.metric_name,
                             floor=args.floor, target=args.target)
        out.write(PLAN_FILE, lambda p: write_plan(p, record), NAME)
    n = sum(len(v) for v in result.plan.values())
    print(f"\nrecommended: {result.recommended}, removing {n} of {model.cfg.n_heads_total} heads: {result.plan}")
    for method, r in result.stats.get("methods", {}).items():
        print(f"  {method}: {r['n_pruned']} heads can go (interval {r['n_low']}-{r['n_high']})")
    if (result.stats.get("comparison") or {}).get("sentence"):
        print(result.stats["comparison"]["sentence"])
    print(f"wrote {args.out}/pruning.csv and {PLAN_FILE}")
    return model, task, result.plan


def _save_pruned(model, task, plan, args) -> None:
    """Remove ``plan``'s heads, save the smaller model to ``--save-model`` and print what it saves."""
    from headlens.pruning.physical import measure_speedup, prune_heads

    pruned = prune_heads(model, plan)
    if args.format in ("hf", "hf-padded"):
        from headlens.io.to_hf import save_hf

        save_hf(pruned, args.save_model, padded=args.format == "hf-padded", overwrite=args.overwrite)
    else:
        from headlens.io.native import save_model

        save_model(pruned, args.save_model, overwrite=args.overwrite)
    batch = task.batches(model, args.batch_size)[0].inputs
    s = measure_speedup(model, pruned, batch)
    print(f"saved the pruned model to {args.save_model}: {s['params_pruned']:,} parameters "
          f"({100 * s['param_fraction']:.1f}% of {s['params_full']:,}), forward {s['time_pruned_ms']:.1f} ms "
          f"vs {s['time_full_ms']:.1f} ms (speed-up {s['speedup_median']:.2f}x, {s['speedup_low']:.2f}-"
          f"{s['speedup_high']:.2f}x over {s['repeats']} repeats)")

"""``headlens prune``: pruning curves (Michel et al. iterative, ablation order, random), a plan,
and optionally the physically pruned model with its parameter count and speed-up."""
from __future__ import annotations

import json
import time

from .importance import load_model_and_task
from .options import add_shared

NAME = "prune"
HELP = "pruning curves and a pruning plan; optionally save the physically pruned model"
DESCRIPTION = ("Order the heads for removal by Michel et al.'s iterative gradient importance, by the "
               "single-head ablation sweep, and at random (several seeds); choose plans on one split "
               "of the task and score them on the other. Writes pruning.csv and prune_plan.json, and "
               "with --save-model a model with the planned heads' weights removed.")


def add_arguments(parser) -> None:
    add_shared(parser, "--model", "--task", "--metric")
    parser.add_argument("--methods", nargs="+", default=["michel", "ablation", "random"],
                        choices=["michel", "ablation", "random"], help="pruning orders to compare")
    parser.add_argument("--target", type=float, default=0.5, help="largest fraction of heads to remove")
    parser.add_argument("--floor", type=float, default=None,
                        help="keep at least this fraction of the unpruned metric (e.g. 0.9); default: prune to --target")
    parser.add_argument("--step", type=float, default=0.1, help="fraction of all heads removed per step")
    parser.add_argument("--n-random", type=int, default=3, help="random orders (seeds)")
    parser.add_argument("--split", type=float, default=0.5, help="fraction of examples used to choose the plan")
    parser.add_argument("--kind", default="zero", choices=["zero", "mean", "resample", "uniform"],
                        help="ablation used to order heads by the sweep")
    add_shared(parser, "--n-examples", "--batch-size", "--seed", "--device", "--dtype")
    parser.add_argument("--out", default="headlens-prune", help="folder for pruning.csv and prune_plan.json")
    parser.add_argument("--save-model", default=None, help="folder for the physically pruned model (recommended plan)")
    parser.add_argument("--format", default="hf", choices=["hf", "headlens"],
                        help="transformers-layout folder (headlens.export.save_hf) or headlens checkpoint")
    add_shared(parser, "--no-progress")


def run(args) -> int:
    import pandas as pd

    from ..files import writable_folder
    from ..physical import measure_speedup, prune_heads
    from ..pruning import pruning_curve

    start = time.perf_counter()
    out = writable_folder(args.out)  # a file or an unwritable folder fails now, not after the analysis
    model, task = load_model_and_task(args)
    result = pruning_curve(model, task, methods=args.methods, target=args.target, floor=args.floor, step=args.step,
                           n_random=args.n_random, split=args.split, seed=args.seed, kind=args.kind,
                           batch_size=args.batch_size, progress=not args.no_progress)
    curve = result.curve
    with pd.option_context("display.width", 200, "display.max_rows", 1000):
        print(curve.round(4).to_string(index=False))
    curve.to_csv(out / "pruning.csv", index=False)
    record = {"recommended": result.recommended, "plan": result.plan, "plans": result.plans,
              "task": task.name, "metric": task.metric_name, "floor": args.floor, "target": args.target}
    with open(out / "prune_plan.json", "w") as f:
        json.dump(record, f, indent=2)
    n = sum(len(v) for v in result.plan.values())
    print(f"\nrecommended: {result.recommended}, removing {n} of {model.cfg.n_heads_total} heads: {result.plan}")
    print(f"wrote {args.out}/pruning.csv and prune_plan.json")
    if args.save_model:
        pruned = prune_heads(model, result.plan)
        if args.format == "hf":
            from ..export import save_hf

            save_hf(pruned, args.save_model)
        else:
            from ..checkpoint import save_model

            save_model(pruned, args.save_model)
        batch = task.batches(model, args.batch_size)[0].inputs
        s = measure_speedup(model, pruned, batch)
        print(f"saved the pruned model to {args.save_model}: {s['params_pruned']:,} parameters "
              f"({100 * s['param_fraction']:.1f}% of {s['params_full']:,}), forward {s['time_pruned_ms']:.1f} ms "
              f"vs {s['time_full_ms']:.1f} ms (speed-up {s['speedup']:.2f}x)")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0

"""``headlens report``: the whole pipeline from a model to a report folder (see :mod:`headlens.reporting.pipeline`)."""
from __future__ import annotations

import argparse
import shlex

from headlens.cli.options import add_shared

DISTRIBUTED = True  # shares its work over the ranks of a torchrun job (see headlens.cli.app)
NAME = "report"
HELP = "analyse every head of a model and write a research report (the default command)"
DESCRIPTION = (
    "Run capture -> pattern scores and roles -> clustering -> ablation sweep with bootstrap CIs -> "
    "gradient importance -> pruning curve on MODEL and TASK, and write OUT/report.html, report.md, "
    "heads.csv, clusters.csv, pruning.csv, prune_plan.json, figures/ and run.json. With no "
    "arguments it analyses the bundled MiniLM on its bundled task. Re-running the same command "
    "after an interruption resumes where it stopped.")


def add_arguments(p) -> None:
    from headlens.model.config import DTYPE_CHOICES
    from headlens.reporting.pipeline import DEFAULT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="bundled model name (see 'headlens models'), a headlens checkpoint folder, a "
                        "transformers checkpoint folder, or a hub name when online")
    p.add_argument("--task", "-t", default=None,
                   help="bundled task name or a task file (text lines or JSONL) defining the metric "
                        "the importance sweep and pruning use; None: the model's bundled task")
    p.add_argument("--out", "-o", default="headlens-report", help="folder the report is written to")
    add_shared(p, "--ablation")
    p.add_argument("--metric", default=None,
                   help="metric of the task to use when it offers several; None: the task's own")
    add_shared(p, "--batch-size")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="weights' dtype")
    add_shared(p, "--device-map", "--max-memory")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for bootstrap, clustering, random pruning and data sampling; the same "
                        "seed gives byte-identical tables")
    p.add_argument("--n-examples", type=int, default=48,
                   help="texts for the pattern scores and task examples for the importance sweep")
    p.add_argument("--prune-target", type=float, default=0.5,
                   help="fraction of all heads the pruning curve goes up to")
    p.add_argument("--prune-floor", type=float, default=0.9,
                   help="fraction of the full model's metric a pruning plan must keep (chosen on one "
                        "half of the task, reported on the other); 1 or more disables it (plans then "
                        "prune to --prune-target)")
    p.add_argument("--n-bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the importance confidence intervals")
    p.add_argument("--n-clusters", type=int, default=None,
                   help="number of head clusters; None: chosen by silhouette")
    add_shared(p, "--no-progress")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the stages an interrupted run of the same configuration finished in OUT")
    p.add_argument("--force", action="store_true",
                   help="discard the resume state an interrupted run left in OUT and start over")
    p.add_argument("--keep-resume", action="store_true",
                   help="keep OUT/.resume after the report is written (re-running then only "
                        "redraws and rewrites the report)")
    p.add_argument("--circuits", action="store_true",
                   help="add a Circuits section: patching, path patching, composition and an EAP-IG circuit "
                        "verified by exact patching (decoders; the task needs corrupted inputs, e.g. ioi)")
    p.add_argument("--long-context", type=int, default=None, metavar="TOKENS",
                   help="add a 'Long context' section: headlens kv-heads at this length (decoders)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="texts for the pattern scores and clusters: a text file (one per line), a JSONL or Parquet "
                        "file (field 'text') or a saved datasets folder, read lazily, of any size (default: "
                        "--n-examples bundled sentences)")
    add_shared(p, "--truncate")
    p.add_argument("--quiet", "-q", action="store_true", help="print only where the report is")


def run(args) -> int:
    from headlens.reporting.pipeline import report
    from headlens.runtime.devices import parse_device_map, parse_max_memory

    options = [("--model", args.model), ("--task", args.task), ("--out", args.out),
               ("--ablation", args.ablation), ("--metric", args.metric), ("--batch-size", args.batch_size),
               ("--device", args.device), ("--dtype", args.dtype), ("--seed", args.seed),
               ("--n-examples", args.n_examples), ("--prune-target", args.prune_target),
               ("--prune-floor", args.prune_floor), ("--n-bootstrap", args.n_bootstrap),
               ("--n-clusters", args.n_clusters), ("--long-context", args.long_context),
               ("--device-map", args.device_map), ("--max-memory", args.max_memory), ("--data", args.data)] + \
        ([("--circuits", "")] if args.circuits else []) + ([("--truncate", "")] if args.truncate else [])
    command = "headlens report " + " ".join(f"{k} {shlex.quote(str(v))}" if v != "" else k
                                            for k, v in options if v is not None)
    rep = report(model=args.model, task=args.task, out=args.out, ablation=args.ablation, metric=args.metric,
                 batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
                 n_examples=args.n_examples, prune_target=args.prune_target,
                 prune_floor=args.prune_floor if args.prune_floor < 1 else None, n_bootstrap=args.n_bootstrap,
                 n_clusters=args.n_clusters, progress=not args.no_progress, resume=args.resume,
                 force=args.force, keep_resume=args.keep_resume, circuits=args.circuits, command=command,
                 long_context=args.long_context, device_map=parse_device_map(args.device_map),
                 max_memory=parse_max_memory(args.max_memory), data=args.data, truncate=args.truncate)
    print(rep.html if args.quiet else rep.summary())
    return 0

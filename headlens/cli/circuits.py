"""``headlens circuits``: what each important head reads from, writes to and composes with (see
:mod:`headlens.reporting.circuits` for the analyses and the files)."""
from __future__ import annotations

import shlex

from headlens.cli.options import add_shared

DISTRIBUTED = False  # one process: refused under a torchrun job of several (see headlens.cli.app)
NAME = "circuits"
HELP = "circuits between heads: logit attribution, activation and path patching, composition, EAP-IG circuits"
DESCRIPTION = (
    "On a decoder and a task with corrupted (counterfactual) inputs -- the bundled 'ioi', or 'induction' "
    "(repeated random tokens, corrupted by shuffling the first copy) -- run direct logit attribution, "
    "activation patching of every head's z / q / k / v / pattern, path patching sender -> receiver "
    "through q, k, v and into the logits, Q/K/V-composition scores against a random baseline, OV "
    "copying scores, and EAP-IG edge scores with a circuit chosen on half of the examples and verified "
    "by exact edge patching on the other half. Writes OUT/dla.csv, patching.csv, path_patching.csv, "
    "composition.csv, edges.csv, faithfulness.csv, circuit.json, circuits.md, figures/ and run.json, "
    "atomically; re-running the same command resumes.")


def add_arguments(parser) -> None:
    parser.add_argument("--model", "-m", required=True, help="bundled name, folder or hub name (headlens.load)")
    parser.add_argument("--task", "-t", default=None,
                        help="'induction', a bundled contrast task (ioi) or a task file with corrupted inputs "
                             "(default: the model's bundled task)")
    parser.add_argument("--out", "-o", required=True, help="folder the results are written to")
    parser.add_argument("--n-examples", type=int, default=32, help="task examples (half choose the circuit, "
                                                                   "half verify it)")
    add_shared(parser, "--seed")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    parser.add_argument("--activations", default="z,q,k,v,pattern",
                        help="comma-separated activations to patch (z, q, k, v, pattern)")
    parser.add_argument("--direction", default="denoise", choices=["denoise", "noise"],
                        help="activation patching: clean values into the corrupted run (denoise, as "
                             "TransformerLens' patching) or corrupted values into the clean run (noise)")
    parser.add_argument("--top-heads", type=int, default=12,
                        help="key heads (largest z-patching effect) whose q / k / v / pattern are patched and "
                             "which are path-patched, on models with more than --path-heads heads")
    parser.add_argument("--position-heads", type=int, default=6,
                        help="key heads whose z is also patched one position at a time (0: none)")
    parser.add_argument("--path-heads", type=int, default=64,
                        help="path-patch between every pair of heads when the model has at most this many heads")
    parser.add_argument("--method", default="eap-ig", choices=["eap-ig", "eap"], help="edge attribution method")
    parser.add_argument("--ig-steps", type=int, default=5, help="integrated-gradient steps of EAP-IG")
    parser.add_argument("--target", type=float, default=0.8,
                        help="faithfulness the circuit must reach on the selection half (fewest edges)")
    parser.add_argument("--n-edges", type=int, default=None, help="keep the top N edges instead of --target")
    add_shared(parser, "--device", "--dtype", "--no-progress")
    parser.add_argument("--force", action="store_true", help="discard the resume state of an interrupted run")


def run(args) -> int:
    from headlens.circuits.tasks import circuit_task
    from headlens.importance.tasks import default_task_name
    from headlens.io.loading import load
    from headlens.reporting.circuits import circuits

    model = load(args.model, dtype=args.dtype, device=args.device)
    task = circuit_task(args.task or default_task_name(model), model, n_examples=args.n_examples, seed=args.seed)
    config = dict(batch_size=args.batch_size, n_bootstrap=args.n_bootstrap, seed=args.seed,
                  activations=tuple(a.strip() for a in args.activations.split(",") if a.strip()),
                  direction=args.direction,
                  top_heads=args.top_heads, position_heads=args.position_heads, path_heads=args.path_heads,
                  method=args.method, steps=args.ig_steps,
                  target=args.target, n_edges=args.n_edges)
    options = [("--model", args.model), ("--task", args.task), ("--out", args.out), ("--n-examples", args.n_examples),
               ("--seed", args.seed), ("--batch-size", args.batch_size), ("--n-bootstrap", args.n_bootstrap),
               ("--activations", args.activations), ("--direction", args.direction),
               ("--top-heads", args.top_heads),
               ("--position-heads", args.position_heads),
               ("--path-heads", args.path_heads), ("--method", args.method), ("--ig-steps", args.ig_steps),
               ("--target", args.target), ("--n-edges", args.n_edges), ("--device", args.device),
               ("--dtype", args.dtype)]
    command = "headlens circuits " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in options if v is not None)
    res = circuits(model, task, args.out, config, force=args.force, progress=not args.no_progress, command=command)
    print(f"headlens circuits: {model.cfg.name} on {task.name} ({len(task)} examples)\n")
    print("\n".join(f"- {f}" for f in res["findings"]))
    print(f"\nWrote {args.out}/ (circuit.json, edges.csv, path_patching.csv, composition.csv, figures/ ...)")
    return 0

"""``headlens kv-heads``: which kv heads can stream (sink + recent window) and which must keep a
full KV cache, with evidence, and the plan for the tools that apply it (``kv_plan.json``)."""
from __future__ import annotations

import time

DISTRIBUTED = False  # one process: refused under a torchrun job of several (see headlens.cli.app)
NAME = "kv-heads"
HELP = "sink, retrieval and streaming heads of a decoder, and a KV-cache plan (kv_plan.json)"
DESCRIPTION = ("On long-context passkey / needle / multi-key retrieval and long-document LM loss over "
               "real prose: every query head's sink rate (Gu et al. 2024) and retrieval score (Wu et al. "
               "2024), every kv head's streaming damage (the answer-loss change when it alone keeps only a "
               "sink + window cache after the context; exact sweep, bootstrap CIs). The plan streams the "
               "least damaging kv heads (--full-fraction or --damage-budget), chosen on the select split "
               "and scored on the held-out one against random, retrieval-score and sink-rate plans at the "
               "same compression. Writes kv_heads.csv, query_heads.csv, plans.csv, retrieval_ablation.csv, "
               "figures/ and kv_plan.json (its format: README); --export-hf also writes the model as a "
               "transformers folder for kvpress.")


def add_arguments(parser) -> None:
    from headlens.cli.options import add_shared
    from headlens.longcontext.tasks import KINDS, LENGTHS

    parser.add_argument("--model", default="smollm2", help="a decoder: bundled name, folder or hub name")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024], choices=LENGTHS, help="tokens per example")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="long-context task kinds to use")
    parser.add_argument("--n-per-group", type=int, default=4, help="examples per kind, length and split")
    parser.add_argument("--sink", type=int, default=4, help="first positions a streaming head keeps")
    parser.add_argument("--window", type=int, default=64, help="recent positions a streaming head keeps")
    parser.add_argument("--full-fraction", type=float, default=0.5, help="fraction of kv heads that keep a full cache")
    parser.add_argument("--damage-budget", type=float, default=None,
                        help="instead: stream as many kv heads as keep the joint answer-loss increase on the "
                             "select split within this budget")
    parser.add_argument("--compressions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="fractions of KV memory saved at which plans are compared")
    parser.add_argument("--n-random", type=int, default=5, help="random plans (seeds)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    add_shared(parser, "--seed")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per forward pass")
    add_shared(parser, "--device", "--dtype")
    parser.add_argument("--out", default="headlens-kv-heads", help="output folder")
    parser.add_argument("--export-hf", default=None, metavar="DIR",
                        help="also write the model as a transformers folder (what kvpress loads)")
    add_shared(parser, "--no-progress")


def run(args) -> int:
    from headlens.storage.folders import FolderLock, check_ownable, model_output

    start = time.perf_counter()
    check_ownable(args.out, "--out")  # a file or someone else's folder fails now, not after the analysis
    if args.export_hf:
        from headlens.io.digest import source_path

        model_output(args.export_hf, source=source_path(args.model), name="--export-hf")
    with FolderLock(args.out, name="--out") as lock:
        return _run(args, lock.folder, start)


def _run(args, out, start) -> int:
    from headlens.io.loading import load
    from headlens.longcontext.analysis import kv_heads
    from headlens.model.config import parse_dtype
    from headlens.reporting.longcontext import summary_lines, write_kv_heads

    kwargs = {k: v for k, v in (("device", args.device), ("dtype", parse_dtype(args.dtype))) if v is not None}
    model = load(args.model, **kwargs)
    result = kv_heads(model, lengths=args.lengths, kinds=args.kinds, n_per_group=args.n_per_group, sink=args.sink,
                      window=args.window, full_fraction=args.full_fraction, damage_budget=args.damage_budget,
                      compressions=args.compressions, n_random=args.n_random, n_bootstrap=args.n_bootstrap,
                      seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    write_kv_heads(result, out)
    if args.export_hf:
        from headlens.io.to_hf import save_hf

        save_hf(model, args.export_hf)
    print("\n".join(f"- {line}" for line in summary_lines(result)))
    print(f"wrote {out}/kv_heads.csv, kv_plan.json, plans.csv, figures/ in {time.perf_counter() - start:.0f} s")
    return 0

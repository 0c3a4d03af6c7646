"""Command-line options that several subcommands share, declared once so that their names,
defaults and help read the same everywhere (``headlens prune``, ``headlens scores``, ...)."""
from __future__ import annotations

SHARED = {
    "--model": dict(default="minilm", help="bundled name, folder or hub name (headlens.load)"),
    "--task": dict(default=None, help="bundled task or file (default: the model's default task)"),
    "--ablation": dict(default="zero", choices=("zero", "mean", "resample", "uniform"),
                       help="how a head is removed: zero its output, replace it by its dataset mean, by "
                            "another example's (resample), or make its attention uniform"),
    "--metric": dict(default=None, help="text-task type (lm, mlm, fidelity) or the task's metric option "
                                        "(logit_diff, accuracy, cosine_margin)"),
    "--n-examples": dict(type=int, default=None, help="use the first N examples of the task"),
    "--batch-size": dict(type=int, default=16, help="examples per forward pass"),
    "--seed": dict(type=int, default=0, help="random seed (probe tokens, bootstrap, random orders)"),
    "--device": dict(default=None, help="torch device, e.g. cpu or cuda (default: the loader's)"),
    "--dtype": dict(default=None, help="weights' dtype: float32, float16 or bfloat16 (default: the loader's)"),
    "--device-map": dict(default=None, metavar="MAP",
                         help="a model larger than one device: 'auto' (accelerate, under --max-memory) or JSON "
                              "{layer: device}, e.g. '{\"0\": \"cuda:0\", \"1\": \"cuda:1\"}' (instead of --device)"),
    "--max-memory": dict(default=None, metavar="JSON",
                         help="memory per device for --device-map auto, e.g. '{\"0\": \"20GiB\", \"1\": \"20GiB\"}'"),
    "--no-progress": dict(action="store_true", help="do not show progress bars"),
    "--overwrite": dict(action="store_true", help="replace the contents of a non-empty output folder (or an "
                                                  "existing output file); the model's own folder is never replaced"),
    "--truncate": dict(action="store_true", help="cut texts longer than the model's context instead of stopping "
                                                 "with an error"),
}


def add_shared(parser, *flags: str) -> None:
    """Add the shared options ``flags`` (keys of :data:`SHARED`, e.g. ``"--model"``) to ``parser``,
    in that order."""
    for flag in flags:
        parser.add_argument(flag, **SHARED[flag])

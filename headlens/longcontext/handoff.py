"""The hand-off to kvpress: the files it reads and the run of ``kvpress_worker.py`` in kvpress'
own virtualenv (kvpress 0.5.x pins ``transformers<5.3``; its forward hook reads
``kwargs["past_key_values"]``, which the transformers headlens uses no longer passes).

headlens writes the model as a transformers folder (:func:`headlens.io.to_hf.save_hf`), the
plan (``kv_plan.json``, :mod:`headlens.longcontext.plans`) and the prompts as token ids
(:func:`write_prompts`); the worker reads only those, so both sides run the same tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

from headlens.errors import HeadlensError, check
from headlens.files import atomic_write

WORKER = Path(__file__).with_name("kvpress_worker.py")
VENV = Path(__file__).resolve().parents[2] / ".venv-kvpress"  # made by scripts/setup.sh --test


def kvpress_python() -> Optional[Path]:
    """kvpress' interpreter: ``$HEADLENS_KVPRESS_PYTHON``, else ``.venv-kvpress/bin/python`` in the
    checkout; None when neither exists."""
    env = os.environ.get("HEADLENS_KVPRESS_PYTHON")
    for p in ([Path(env)] if env else []) + [VENV / "bin" / "python"]:
        if p.is_file():
            return p
    return None


def write_prompts(task, path) -> Path:
    """The examples of a :class:`headlens.longcontext.tasks.LongContextTask` as JSONL token ids."""
    lines = [json.dumps(dict(id=task.record_ids[i], kind=task.kinds[i], tokens=task.tokens[i],
                             context_len=task.context_len[i], answer_start=task.answer_start[i]))
             for i in range(len(task))]
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())
    return Path(path)


def run_kvpress(model_dir, prompts, configs: dict, out, check_first: bool = False, python=None,
                timeout: float = 3600, threads: int = 0) -> pd.DataFrame:
    """Run the worker on ``configs`` ``{name: "full" | "duo:PLAN" | "knorm:R" | "snapkv:R" |
    "streaming_llm:R"}``; one row per (config, example) (see ``kvpress_worker.py``)."""
    python = Path(python) if python else kvpress_python()
    check(python is not None and Path(python).is_file(),
          "kvpress' virtualenv is missing: run scripts/setup.sh --test (it makes .venv-kvpress), "
          "or set HEADLENS_KVPRESS_PYTHON")
    cmd = [str(python), str(WORKER), "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)]
    cmd += [a for name, spec in configs.items() for a in ("--config", f"{name}={spec}")]
    cmd += ["--check"] if check_first else []
    cmd += ["--threads", str(threads)] if threads else []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise HeadlensError(f"kvpress worker failed ({proc.returncode}): {tail[0]}")
    print(proc.stdout.strip(), file=sys.stderr)
    return pd.read_json(out, lines=True)

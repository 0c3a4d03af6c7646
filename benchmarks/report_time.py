"""How long the default report takes: ``python -m headlens report`` (bundled MiniLM, its default
task and settings) run as a user runs it, in a fresh process, into a scratch folder.

    python benchmarks/report_time.py               # one run -> benchmarks/results/report_time.json
    python benchmarks/report_time.py --repeats 3

Per run: the wall-clock seconds of the whole command (start-up, model load and writing included),
the CPU seconds the process used (user + system, summed over its threads), the stage timings
headlens records in ``run.json`` and the load average before and after. On a machine other jobs
share, the wall time grows with the load while the CPU seconds stay close to the work itself: on
a quiet 2-core CPU the wall time lies between CPU / 2 (both cores busy all along) and CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = [sys.executable, "-m", "headlens", "report", "--no-progress", "--quiet"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run() -> dict:
    """Run the default report once into a scratch folder; its timings."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "report"
        load_before, cpu_before, started = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
        subprocess.run(COMMAND + ["--out", str(out)], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
        run = json.loads((out / "run.json").read_text())
    stages = {k: v for k, v in run["timings_s"].items() if not k.endswith("(cpu)")}
    return dict(wall_s=round(wall, 1), cpu_s=round(cpu, 1), load_before=round(load_before, 2),
                load_after=round(os.getloadavg()[0], 2), stages_s=stages,
                task=run["data"]["task"], task_examples=run["data"]["task_examples"],
                torch_threads=run.get("platform", {}).get("torch_threads"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "report_time.json")
    args = parser.parse_args(argv)
    runs = [one_run() for _ in range(args.repeats)]
    result = dict(command=" ".join(["python", "-m", "headlens", "report"]), runs=runs,
                  cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"wall {r['wall_s']} s, CPU {r['cpu_s']} s, load average {r['load_before']} -> {r['load_after']}")


if __name__ == "__main__":
    main()

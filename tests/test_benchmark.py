"""The benchmark script's code paths on tiny sizes: headlens' sweeps agree with the
TransformerLens loop it races against, and the analytic FLOP counts its efficiency figures rest
on equal what torch's FlopCounterMode counts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.mark.slow
def test_quick_benchmark_agrees_and_counts_flops_exactly(tmp_path):
    out = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-memory", "--models", "small_4l",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(out.read_text())["models"]["small_4l"]
    assert m["sweep_zero_max_diff"] < 1e-4 and m["sweep_mean_max_diff"] < 1e-4
    assert m["gradient_max_rel_diff"] < 1e-4
    assert max(abs(v) for row in m["sweep_zero_importance_bridge"] for v in row) > 1e-3  # heads matter
    for key in ("sweep_zero", "sweep_mean"):
        for side in ("transformer_lens_loop", "headlens_fast"):
            assert m["flops"][key][side] == pytest.approx(m["flops_counted"][key][side], rel=1e-9)
    assert m["flops"]["forward"] == pytest.approx(m["flops_counted"]["forward"], rel=1e-9)


@pytest.mark.slow
def test_quick_gpu_rows_run_on_the_cpu(tmp_path):
    """The rows written for a GPU (forward vs transformers sdpa, sweep vs the bridge loop) run on
    tiny sizes here, and the sweep agrees with the loop."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--rows", "gpu", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    g = json.loads(out.read_text())["gpu"]
    assert g["sweep_max_diff"] < 1e-4 and g["max_logit_diff_vs_sdpa"]["headlens"] < 1e-4
    assert set(g["median_s"]) == {"forward/headlens", "forward/transformers_sdpa", "forward/transformers_eager",
                                  "sweep_zero/headlens", "sweep_zero/bridge_loop"}

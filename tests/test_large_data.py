"""Large data: texts and tasks read lazily from files of any size (text, JSONL, Parquet, a saved
``datasets`` folder), and a fast sweep whose memory does not grow with the number of examples
(the examples are swept in blocks that fit ``cache_budget_mb``).
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from headlens.data.streams import Column, open_records, open_texts
from headlens.errors import HeadlensError
from headlens.importance.sweep import ablation_sweep, sweep_metrics
from headlens.importance.tasks import FidelityTask, load_task

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a cat dog sat ran on in mat park bird sings morning river old bridge walked we they".split()


def sentences(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def write_all(folder, texts) -> dict:
    """The same texts as a text file (with blank lines), JSONL, Parquet and a datasets folder."""
    paths = {"txt": folder / "t.txt", "jsonl": folder / "t.jsonl", "parquet": folder / "t.parquet"}
    paths["txt"].write_text("\n\n".join(texts) + "\n")
    paths["jsonl"].write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=97)
    try:
        import datasets
    except ImportError:  # datasets is optional: the other formats are still checked
        return paths
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder / "ds"))
    paths["datasets"] = folder / "ds"
    return paths


def test_every_format_reads_the_same_texts_lazily(tmp_path):
    texts = sentences(500)
    for kind, path in write_all(tmp_path, texts).items():
        column = open_texts(path)
        assert isinstance(column, Column) and len(column) == 500, kind
        assert column[0] == texts[0] and column[-1] == texts[-1] and column[250] == texts[250], kind
        assert list(column) == texts, kind
        assert list(column.take([9, 2])) == [texts[9], texts[2]] and list(column[3:6]) == texts[3:6], kind
        assert list(open_texts(path, limit=7)) == texts[:7], kind
    assert open_records(tmp_path / "t.jsonl")[4] == {"text": texts[4], "n": 4}


def test_bad_files_get_one_line_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(HeadlensError, match="line 2 is not valid JSONL"):
        list(open_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "other.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(HeadlensError, match="no field 'text'"):
        open_texts(tmp_path / "other.jsonl")[0]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(HeadlensError, match="holds no records"):
        open_texts(tmp_path / "empty.txt")
    with pytest.raises(HeadlensError, match="does not exist"):
        open_texts(tmp_path / "missing.txt")
    with pytest.raises(HeadlensError, match="not a dataset"):
        open_texts(tmp_path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(HeadlensError, match="not a readable Parquet"):
        open_texts(tmp_path / "broken.parquet")


def test_a_task_from_a_file_stays_on_disk_and_scores_as_a_list(tiny_gpt2, tmp_path):
    texts = sentences(3000, seed=1)
    path = write_all(tmp_path, texts)["jsonl"]
    task = load_task(str(path), tiny_gpt2, task_type="fidelity", measure="cosine", n_examples=40)
    assert isinstance(task.texts, Column) and len(task) == 40
    assert isinstance(task.subset([3, 1]).texts, Column) and task.subset([3, 1]).rows(0) == [texts[3]]
    listed = FidelityTask(texts[:40], measure="cosine")
    np.testing.assert_allclose(task.evaluate(tiny_gpt2, batch_size=8), listed.evaluate(tiny_gpt2, batch_size=8),
                               atol=1e-6)
    kwargs = dict(ablation="mean", heads={1: None}, batch_size=8, n_bootstrap=0, progress=False)
    pd.testing.assert_frame_equal(ablation_sweep(tiny_gpt2, task, **kwargs), ablation_sweep(tiny_gpt2, listed, **kwargs),
                                  check_exact=False, atol=1e-6)


@pytest.mark.parametrize("ablation", ["zero", "mean", "uniform"])
def test_a_sweep_in_blocks_equals_one_in_one_block(tiny_gpt2, tmp_path, ablation):
    """Small blocks (a few batches each) give the per-example metrics of one block: the mean of a
    mean ablation is still over every example; each block's units are saved for resume."""
    task = FidelityTask(sentences(30, seed=2), measure="cosine")
    kwargs = dict(ablation=ablation, heads={0: [0, 1], 2: None}, batch_size=4, progress=False)
    heads, clean, whole = sweep_metrics(tiny_gpt2, task, **kwargs)
    _, clean_b, blocked = sweep_metrics(tiny_gpt2, task, cache_budget_mb=0.05, resume_dir=tmp_path, **kwargs)
    np.testing.assert_allclose(clean_b, clean, atol=1e-7)
    for h in heads:
        np.testing.assert_allclose(blocked[h], whole[h], atol=1e-6, err_msg=str(h))
    blocks = {p.stem.rsplit("_block", 1)[1] for p in tmp_path.glob("layer*.safetensors")}
    assert len(blocks) >= 3, blocks  # several blocks, each unit on its own


SMALL, LARGE = 300, 1500


def measure_in_this_process(model_dir: str, folder: str) -> dict:
    """RSS growth (MB) of fast mean-ablation sweeps over SMALL and LARGE examples read from a
    file, in blocks (cache budget 1 MB), and of LARGE in one block (the control, whose cached
    activations grow with the data); run in a fresh process."""
    import threading

    import psutil
    import torch

    from headlens.io.native import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir)
    path = os.path.join(folder, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n".join(sentences(LARGE, seed=3)) + "\n")

    def growth(n, budget) -> float:
        task = load_task(path, model, task_type="fidelity", measure="cosine", n_examples=n)
        process, stop, peak = psutil.Process(), threading.Event(), [0]
        start = process.memory_info().rss

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                stop.wait(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        sweep_metrics(model, task, "mean", heads={0: [0, 1]}, batch_size=32, cache_budget_mb=budget, progress=False)
        stop.set()
        thread.join()
        return (max(peak[0], process.memory_info().rss) - start) / 2**20

    growth(100, 1.0)  # warm-up
    return {"small": growth(SMALL, 1.0), "large": growth(LARGE, 1.0), "one_block": growth(LARGE, 1e4)}


@pytest.mark.slow  # a fresh interpreter
def test_sweep_memory_does_not_grow_with_the_examples(tiny_gpt2, tmp_path):
    pytest.importorskip("psutil")
    from headlens.io.native import save_model

    save_model(tiny_gpt2, tmp_path / "model")
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_large_data as t; "
            f"print(json.dumps(t.measure_in_this_process({str(tmp_path / 'model')!r}, {str(tmp_path)!r})))")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    report = f"RSS growth MB: {SMALL} examples {m['small']:.1f}, {LARGE} {m['large']:.1f}, {LARGE} in one block " \
             f"{m['one_block']:.1f}"
    print(report)
    assert m["large"] < m["small"] + 8, report  # 5x the examples, the same memory ...
    assert m["one_block"] > m["large"] + 8, report  # ... while one block's cache does grow (the control)

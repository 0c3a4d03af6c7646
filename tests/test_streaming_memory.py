"""Bounded memory: a dataset larger than memory is streamed in batches.

- :func:`headlens.data.corpora.read_lines` reads a text file lazily, and the streaming statistics
  (:func:`headlens.patterns.scores.pattern_scores` through :func:`headlens.patterns.capture.stream_head_stats`) pull
  at most one length-sorting chunk (``32 * batch_size`` items) ahead of what they have processed;
- over a dataset generated on the fly, 5x more items need no more memory: neither Python objects
  (tracemalloc peak) nor tensors (process RSS, sampled while it runs), measured in a fresh process.
  A control run whose statistic keeps every batch shows that the same measurement sees a leak.
"""
import random
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from headlens.data.corpora import read_lines
from headlens.patterns.capture import stream_head_stats
from headlens.patterns.scores import pattern_scores, text_statistics

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

psutil = pytest.importorskip("psutil")

WORDS = ("the a cat dog sat ran on in mat park bird sings morning river old bridge walked we they it rains "
         "and then slowly across over under").split()
BATCH = 32
SMALL, LARGE = 1_200, 6_000  # SMALL is already more than one length-sorting chunk (32 x BATCH)


def sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))


def token_sequences(n: int, seed: int = 0):
    """``n`` random token-id sequences of 4..16 tokens, made one at a time (never all in memory)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield [rng.randrange(1000, 30000) for _ in range(rng.randint(4, 16))]


def test_a_file_is_read_lazily_and_streamed_with_bounded_lookahead(tiny_gpt2, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("old first line\n")
    lines = read_lines(path)
    path.write_text("\n".join(sentences(3000)) + "\n")
    assert next(lines) == path.read_text().splitlines()[0]  # the file is opened when iterated, not before

    pulled, processed, lookahead = [0], [0], []

    def counting(items):
        for item in items:
            pulled[0] += 1
            yield item

    def statistic(pb):
        processed[0] += pb.input_ids.shape[0]
        lookahead.append(pulled[0] - processed[0])  # items read from the file but not yet run
        return pb.input_ids.new_zeros(pb.input_ids.shape[0]).double(), pb.attention_mask.sum(-1)

    acc = stream_head_stats(tiny_gpt2, counting(read_lines(path)), {"n": statistic}, batch_size=BATCH)
    assert acc.n_examples == 3000 == pulled[0] == processed[0]
    assert max(lookahead) <= 32 * BATCH, max(lookahead)  # one length-sorting chunk at most

    streamed = pattern_scores(tiny_gpt2, read_lines(path, limit=300), batch_size=BATCH, induction=False)
    listed = pattern_scores(tiny_gpt2, list(read_lines(path, limit=300)), batch_size=BATCH, induction=False)
    columns = [c for c in streamed if c.startswith("score_") and streamed[c].notna().all()]
    assert len(columns) >= 10 and np.allclose(streamed[columns], listed[columns], atol=1e-6)


class PeakRSS:
    """The largest resident set size seen (sampled every 2 ms) while the block runs, above its start."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.stop.wait(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.growth_mb = (self.peak - self.start) / 2**20
        return False


def measure(model, data, statistics) -> tuple:
    """(Python peak MB, RSS growth MB) of streaming ``data`` through ``statistics``."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with PeakRSS() as rss:
        stream_head_stats(model, data, statistics, batch_size=BATCH)
    return (tracemalloc.get_traced_memory()[1] - base) / 2**20, rss.growth_mb


def measure_in_this_process(model_dir: str) -> dict:
    """Stream SMALL and LARGE generated datasets, then LARGE with a leaky statistic, through the
    model saved in ``model_dir``; run in a fresh process, where freed memory of earlier work
    cannot hide a leak from the RSS."""
    from headlens.io.native import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir)
    stats = {"text": text_statistics(model)}
    kept = []

    def leaky(pb):  # a statistic that keeps every batch's patterns: memory grows with the data
        kept.append(pb.patterns)
        return pb.patterns.new_zeros(pb.patterns.shape[0]), pb.attention_mask.sum(-1)

    stream_head_stats(model, token_sequences(200), stats, batch_size=BATCH)  # warm-up
    tracemalloc.start()
    out = {}
    for name, n, statistics in (("small", SMALL, stats), ("large", LARGE, stats),
                                ("leaky", LARGE, dict(stats, leak=leaky))):
        out[f"py_{name}"], out[f"rss_{name}"] = measure(model, token_sequences(n, seed=len(out)), statistics)
    tracemalloc.stop()
    return out


@pytest.mark.slow  # a fresh interpreter, 13k sequences
def test_memory_does_not_grow_with_the_dataset(tiny_gpt2, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from headlens.io.native import save_model

    save_model(tiny_gpt2, tmp_path / "model")
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_streaming_memory as t; "
            f"print(json.dumps(t.measure_in_this_process({str(tmp_path / 'model')!r})))")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    report = (f"Python peak MB {m['py_small']:.2f} / {m['py_large']:.2f} / leaky {m['py_leaky']:.2f}; "
              f"RSS growth MB {m['rss_small']:.1f} / {m['rss_large']:.1f} / leaky {m['rss_leaky']:.1f}")
    print(report)
    # 5x the items, the same Python objects (give or take one length-sorting chunk, ~0.5 MB) ...
    assert m["py_large"] < m["py_small"] + 1.0, report
    assert m["rss_large"] < m["rss_small"] + 16, report  # ... and the same tensors
    # the control: kept patterns (6000 x 12 heads x ~11^2 x 4 bytes) do show up
    assert m["rss_leaky"] > m["rss_large"] + 16, report

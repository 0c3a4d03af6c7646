"""Bad input gets a clear error: a :class:`HeadlensError` whose short, one-line message names the
argument and what was expected -- never a bare traceback from deep inside torch.

Each case is one row: what is wrong, the call, and a pattern its message must match. Loading
errors that ``test_load.py`` already covers (unknown names and folders, configs without a
model_type, unsupported architectures, truncated transformers weights, missing weights, a
tokenizer larger than the vocabulary through ``load``) are not repeated here.
"""
import json
import os

import numpy as np
import pytest
import torch

import headlens
from headlens.data.corpora import read_lines
from headlens.errors import HeadlensError
from headlens.importance.ablation import ablate
from headlens.importance.gradients import attribution_patching, gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import CallableTask, LMLossTask, load_task
from headlens.io.native import load_model, save_model
from headlens.io.to_hf import save_hf
from headlens.model.heads import resolve_heads
from headlens.model.tokens import batches, encode
from headlens.model.transformer import HeadlensModel
from headlens.patterns.capture import capture_patterns, iter_patterns
from headlens.patterns.clusters import HeadClusterer
from headlens.patterns.scores import pattern_scores
from headlens.pruning.curve import pruning_curve
from headlens.pruning.physical import prune_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "we walked to the old bridge and back"]
LONG = "word " * 100  # 100+ tokens; the tiny model's context is 64
NAN = float("nan")


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    """tiny GPT-2: 3 layers x 4 heads, d_model 32, context 64."""
    return tiny_gpt2


def metric_task(values):
    """A callable task whose metric returns ``values(logits)``."""
    return CallableTask(TEXTS, lambda logits, inputs: values(logits))


def ids(b=2, p=5):
    return torch.arange(b * p).view(b, p) + 100


# (id, call(model, tmp_path), pattern the message must match)
CASES = [
    # --- empty data ---
    ("empty texts", lambda m, t: encode(m, []), "texts is empty"),
    ("empty dataset scores", lambda m, t: pattern_scores(m, []), "dataset is empty"),
    ("empty generator capture", lambda m, t: capture_patterns(m, iter([])), "dataset is empty"),
    ("empty dataset clusters", lambda m, t: HeadClusterer(n_clusters=2).fit(m, []), "dataset is empty"),
    ("empty task", lambda m, t: LMLossTask([]), "task 'lm' is empty"),
    ("empty task file", lambda m, t: load_task(_write(t / "e.txt", "\n\n"), m), r"e\.txt' has no non-empty lines"),
    ("empty JSONL task file", lambda m, t: load_task(_write(t / "e.jsonl", "\n"), m),
     r"e\.jsonl' has no non-empty lines"),
    ("empty token sequence", lambda m, t: encode(m, [[1, 2], []]), "token sequence is empty"),
    ("blank text", lambda m, t: encode(m, ["a b", "   "]), r"texts\[1\] is empty"),
    ("no tokens", lambda m, t: m(torch.zeros(2, 0, dtype=torch.long)), "input_ids is empty"),
    ("missing text file", lambda m, t: read_lines(t / "none.txt"), "does not exist"),
    # --- longer than the context ---
    ("long text encode", lambda m, t: encode(m, [LONG]), r"context of 64 tokens.*truncate=True"),
    ("long text scores", lambda m, t: pattern_scores(m, [LONG], induction=False), r"truncate=True"),
    ("long text clusters", lambda m, t: HeadClusterer(n_clusters=2).fit(m, [LONG]), r"truncate=True"),
    ("long ids encode", lambda m, t: encode(m, torch.ones(1, 65, dtype=torch.long)), r"truncate=True"),
    ("long ids forward", lambda m, t: m(torch.ones(1, 65, dtype=torch.long)), "context of 64"),
    # --- indices out of range ---
    ("ablation head", lambda m, t: ablation_sweep(m, LMLossTask(TEXTS), heads=[(0, 4)], progress=False),
     r"head 4 is out of range \(layer 0 has heads 0..3\)"),
    ("ablation layer", lambda m, t: ablate(m, LMLossTask(TEXTS), [(3, 0)]), r"layer 3 is out of range"),
    ("ablation negative", lambda m, t: ablate(m, LMLossTask(TEXTS), [(-1, 0)]), "layer -1 is out of range"),
    ("ablation fractional head", lambda m, t: resolve_heads(m, [(0, 1.5)]), r"pair of integers, got \(0, 1.5\)"),
    ("ablation None head", lambda m, t: resolve_heads(m, [(None, 1)]), "pair of integers"),
    ("ablation heads not a list", lambda m, t: resolve_heads(m, 7), "heads must be None, a"),
    ("ablation layer heads not a list", lambda m, t: resolve_heads(m, {0: 3}), r"heads\[0\] must be a list"),
    ("empty head list", lambda m, t: ablation_sweep(m, LMLossTask(TEXTS), heads=[], progress=False),
     "heads is empty"),
    ("plan head", lambda m, t: prune_heads(m, {0: [1, 4]}), "head 4 is out of range"),
    ("plan layer", lambda m, t: prune_heads(m, {"5": [0]}), "layer 5 is out of range"),
    ("plan word", lambda m, t: prune_heads(m, {"0": ["a"]}), r"plan\['0'\]: head 'a' is not a non-negative integer"),
    ("plan value", lambda m, t: prune_heads(m, {0: 2}), r"plan\[0\] must be a list of head indices"),
    ("plan type", lambda m, t: prune_heads(m, [(0, 1)]), "plan must be a dict"),
    ("gate rows", lambda m, t: m(ids(), head_gate=torch.ones(2, 4)), "one row per layer"),
    ("gate heads", lambda m, t: m(ids(), head_gate=torch.ones(3, 3)), "row 0 has 3 entries, layer 0 has 4 heads"),
    ("gate of numbers", lambda m, t: m(ids(), head_gate=[1, 1, 1]), "head_gate must be a"),
    ("head_mask shape", lambda m, t: gradient_importance(m, LMLossTask(TEXTS), head_mask=torch.ones(3, 5)),
     r"head_mask must have shape \(3, 4\)"),
    ("start layer", lambda m, t: m(residual=torch.zeros(1, 3, 32), start_at_layer=4), "start_at_layer must be"),
    ("stop layer", lambda m, t: m(ids(), stop_at_layer=7), "stop_at_layer must be"),
    ("pattern layer", lambda m, t: next(iter_patterns(m, TEXTS[:1])).layer(3), r"layer must be in \[0, 3\)"),
    ("token id", lambda m, t: m(torch.tensor([[1, 10**6]])), r"input_ids must lie in \[0, 30522\)"),
    ("negative token id", lambda m, t: encode(m, [[3, -1]]), r"token ids must lie in \[0, 30522\)"),
    # --- wrong shapes and types ---
    ("ids 1-d", lambda m, t: m(torch.tensor([1, 2, 3])), r"input_ids must be a \[batch, pos\] tensor"),
    ("ids float", lambda m, t: m(torch.ones(1, 3)), "input_ids must be integer token ids"),
    ("mask shape", lambda m, t: m(ids(), attention_mask=torch.ones(2, 4)), "attention_mask must have the shape"),
    ("positions shape", lambda m, t: m(ids(), position_ids=torch.arange(3)[None]), "position_ids must be"),
    ("residual width", lambda m, t: m(residual=torch.zeros(1, 3, 31), start_at_layer=1), "d_model=32"),
    ("texts not a list", lambda m, t: encode(m, 5), "texts must be a string, a list"),
    ("mixed texts", lambda m, t: encode(m, ["a", 5]), r"texts\[1\] must be a string"),
    ("float token ids", lambda m, t: encode(m, [[1, 2.5]]), "must be a list of integer ids"),
    ("batch size", lambda m, t: list(batches(m, TEXTS, batch_size=0)), "batch_size must be"),
    ("data of numbers", lambda m, t: list(batches(m, 3)), "data must be texts"),
    # --- non-finite values ---
    ("residual NaN", lambda m, t: m(residual=torch.full((1, 3, 32), NAN), start_at_layer=1),
     "residual holds NaN"),
    ("residual inf", lambda m, t: m(residual=torch.full((1, 3, 32), float("inf")), start_at_layer=1),
     "residual holds NaN or infinite"),
    ("gate NaN", lambda m, t: m(ids(), head_gate=torch.full((3, 4), NAN)), "head_gate holds NaN"),
    ("gate list inf", lambda m, t: m(ids(), head_gate=[torch.ones(4), torch.ones(4), torch.tensor([1, 1, 1, np.inf])]),
     "head_gate holds NaN or infinite"),
    ("head_mask NaN", lambda m, t: gradient_importance(m, LMLossTask(TEXTS), head_mask=torch.full((3, 4), NAN)),
     "head_mask holds NaN"),
    ("metric NaN sweep", lambda m, t: ablation_sweep(m, metric_task(lambda x: x[:, 0, 0] * NAN), progress=False),
     "metric 'custom' is NaN or infinite for example 0"),
    ("metric inf gradient", lambda m, t: gradient_importance(m, metric_task(lambda x: x[:, 0, 0] / 0.0)),
     "NaN or infinite"),
    ("metric NaN pruning", lambda m, t: pruning_curve(m, metric_task(lambda x: x[:, 0, 0] * NAN), progress=False),
     "NaN or infinite"),
    ("metric NaN attribution", lambda m, t: attribution_patching(m, metric_task(lambda x: x[:, 0, 0] * NAN), "zero"),
     "NaN or infinite"),
    ("metric shape", lambda m, t: ablation_sweep(m, metric_task(lambda x: x[:, 0, :2]), progress=False),
     r"one value per example \(shape \[4\]\), got shape \(4, 2\)"),
    ("metric None", lambda m, t: ablation_sweep(m, metric_task(lambda x: None), progress=False),
     "fn must return one number per example"),
    ("metric text", lambda m, t: gradient_importance(m, metric_task(lambda x: "good")),
     "fn must return one number per example"),
    # --- output folders ---
    ("report out is a file", lambda m, t: _report(m, _write(t / "f", "x")), "is a file"),
    ("report out under a file", lambda m, t: _report(m, _write(t / "f", "x") / "sub"), "not writable"),
    ("save_model to a file", lambda m, t: save_model(m, _write(t / "f", "x")), "is a file"),
    ("save_model under a file", lambda m, t: save_model(m, _write(t / "f", "x") / "sub"), "not writable"),
    ("save_hf to a file", lambda m, t: save_hf(m, _write(t / "f", "x")), "is a file"),
    ("save_hf under a file", lambda m, t: save_hf(m, _write(t / "f", "x") / "sub"), "not writable"),
    ("sweep checkpoints in a file", lambda m, t: ablation_sweep(m, LMLossTask(TEXTS), progress=False,
                                                                resume_dir=_write(t / "f", "x")), "is a file"),
    ("sweep checkpoints under a file", lambda m, t: ablation_sweep(
        m, LMLossTask(TEXTS), progress=False, resume_dir=_write(t / "f", "x") / "sub"), "not writable"),
]


def _write(path, text):
    path.write_text(text)
    return path


def _report(model, out):
    from headlens.reporting.pipeline import report

    return report(model, task="lm", out=out, n_examples=4, n_bootstrap=0, progress=False)


@pytest.mark.parametrize("call, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_headlens_error(call, pattern, model, tmp_path):
    with pytest.raises(HeadlensError, match=pattern) as err:
        call(model, tmp_path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message  # one short line


def test_truncate_cuts_long_text_to_the_context(model):
    batch = encode(model, [LONG, "a short one"], truncate=True)
    assert batch["input_ids"].shape == (2, 64) and batch["attention_mask"][1].sum() < 10
    scores = pattern_scores(model, [LONG, "a short one"], induction=False, truncate=True)
    assert len(scores) == 12 and np.isfinite(scores.score_previous_token).all()
    assert len(capture_patterns(model, [LONG], truncate=True)[0].input_ids[0]) == 64


def test_lazy_lines_stream_and_check_the_file_at_once(tmp_path):
    path = _write(tmp_path / "t.txt", "one\n\n  two  \nthree\n")
    assert list(read_lines(path)) == ["one", "two", "three"] and list(read_lines(path, limit=2)) == ["one", "two"]
    with pytest.raises(HeadlensError, match="limit"):
        read_lines(path, limit=0)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for call in (lambda: save_model(model, locked / "m"), lambda: save_hf(model, locked),
                     lambda: _report(model, locked / "r")):
            with pytest.raises(HeadlensError, match="not writable"):
                call()
    finally:
        locked.chmod(0o700)


# --- weights -----------------------------------------------------------------------------------
def _small_gpt2(vocab_size=100):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=vocab_size)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("damage, pattern", [
    ("truncate", "corrupted or truncated"),
    ("garbage", "corrupted or truncated"),
    ("nan", "holds NaN or infinite values"),
    ("config", "not valid JSON"),
])
@pytest.mark.parametrize("layout", ["headlens", "transformers"])
def test_damaged_checkpoint_is_refused(layout, damage, pattern, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    hf = _small_gpt2()
    if layout == "headlens":
        save_model(headlens.from_hf_model(hf), folder)
    else:
        hf.save_pretrained(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 8 + os.urandom(200))
    elif damage == "nan":
        state = load_file(str(weights))
        name = sorted(k for k in state if state[k].ndim == 2)[0]
        state[name][0, 0] = NAN
        save_file(state, str(weights), metadata={"format": "headlens" if layout == "headlens" else "pt"})
    else:
        config.write_text(config.read_text()[:-20])
    with pytest.raises(HeadlensError, match=pattern):
        headlens.load(folder)
    if layout == "headlens" and damage != "config":
        with pytest.raises(HeadlensError, match=pattern):
            load_model(folder)


def test_nan_weights_in_memory_and_tokenizer_mismatch_are_refused(bert_tokenizer):
    hf = _small_gpt2()
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[0, 0] = NAN
    with pytest.raises(HeadlensError, match=r"weight 'blocks.0.attn.W_Q' holds NaN"):
        headlens.from_hf_model(hf)
    with pytest.raises(HeadlensError, match="tokenizer has 30522 tokens .* vocabulary of 100"):
        headlens.from_hf_model(_small_gpt2(), bert_tokenizer)


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    """Refused input must not leave half-written output: no folder for a refused export, no
    temporary files after a successful one."""
    model = headlens.from_hf_model(_small_gpt2())
    bad = model.cfg.replace(family="no-such-family")
    with pytest.raises(HeadlensError, match="cannot be exported"):
        save_hf(HeadlensModel.from_state_dict(bad, dict(model.state_dict())), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_model(model, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["format"] == "headlens"


@pytest.mark.parametrize("argv", [["kv-heads", "--model", "smollm2"], ["circuits", "--model", "smollm2"],
                                  ["train-toy", "--toy", "induction-2l"]])
def test_one_process_commands_refuse_a_torchrun_job(argv, tmp_path, monkeypatch, capsys):
    """A command that does not share its work over ranks stops at once under a job of several
    (each rank would run all of it and race for the same --out), with one line naming the ones that do."""
    from headlens.cli.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"headlens {argv[0]} runs in one process" in err[0]
    assert "report, models, scores, importance, prune" in err[0] and not (tmp_path / "o").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["models"]) == 0  # one process: runs

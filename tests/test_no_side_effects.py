"""The model is never left altered: after every public analysis -- finished, failed midway, or
interrupted with Ctrl-C (KeyboardInterrupt) -- no hook is left on any module or hook point, no
parameter has a ``.grad`` or a changed ``requires_grad``, the training flags, the config, the
tokenizer, torch's grad mode and the global random generators are as before, and every weight is
bit-identical (``torch.equal``).

Each analysis runs three times: normally (counting the forward passes of the last layer), then
with a tripwire that raises ``RuntimeError`` and then ``KeyboardInterrupt`` at half of those
passes, i.e. while the analysis has its hooks on. Task-based analyses also meet a metric that
raises on its third call. ``test_the_checker_sees_every_kind_of_change`` shows each check fails
when its property is broken.
"""
import copy
import dataclasses
import random

import numpy as np
import pytest
import torch

from headlens.errors import HeadlensError
from headlens.importance.ablation import ablate
from headlens.importance.gradients import attribution_patching, gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import CallableTask, LMLossTask, load_task
from headlens.model.transformer import HeadlensModel
from headlens.patterns.capture import capture_patterns, stream_head_stats
from headlens.patterns.clusters import HeadClusterer
from headlens.patterns.scores import pattern_scores, text_statistics
from headlens.pruning.curve import pruning_curve
from headlens.pruning.physical import prune_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing in the morning",
         "it rains", "we walked to the old bridge and back", "one two three"]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    """A private copy of the tiny GPT-2, in training mode (analyses must not switch it to eval)."""
    state = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    net = HeadlensModel.from_state_dict(tiny_gpt2.cfg.replace(), state, copy.deepcopy(tiny_gpt2.tokenizer))
    return net.train()


# --- the check --------------------------------------------------------------------------------
def snapshot(model) -> dict:
    tok = model.tokenizer
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "cfg": dataclasses.asdict(model.cfg),
        "tokenizer": (len(tok), tok.pad_token, tok.padding_side, tok.truncation_side, dict(tok.special_tokens_map)),
        "context_level": model.context_level,
        "grad_enabled": torch.is_grad_enabled(),
        "rng": (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_untouched(model, before: dict) -> None:
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), f"{name or 'model'}.{attr} is not empty"
    for name, hp in model.hook_dict.items():
        assert not hp.fwd_hooks and not hp.bwd_hooks, f"hook point {name} still has hooks"
        assert not hp.ctx, f"hook point {name} kept a context"
    assert model.context_level == before["context_level"]
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name} has a .grad"
        assert p.requires_grad == before["requires_grad"][name], f"{name}.requires_grad changed"
    assert {k: m.training for k, m in model.named_modules()} == before["training"], "training flags changed"
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert state[k].dtype == v.dtype and state[k].device == v.device, f"{k} moved or changed dtype"
        assert torch.equal(state[k], v), f"weight {k} changed"
    buffers = dict(model.named_buffers())
    assert buffers.keys() == before["buffers"].keys()
    assert all(torch.equal(buffers[k], v) for k, v in before["buffers"].items()), "a buffer changed"
    assert dataclasses.asdict(model.cfg) == before["cfg"], "model.cfg changed"
    tok = model.tokenizer
    assert (len(tok), tok.pad_token, tok.padding_side, tok.truncation_side,
            dict(tok.special_tokens_map)) == before["tokenizer"], "the tokenizer changed"
    assert torch.is_grad_enabled() == before["grad_enabled"], "torch's grad mode changed"
    torch_rng, np_rng, py_rng = before["rng"]
    assert torch.equal(torch.random.get_rng_state(), torch_rng), "the global torch generator was used"
    assert np.array_equal(np.random.get_state()[1], np_rng), "the global numpy generator was used"
    assert random.getstate() == py_rng, "Python's global generator was used"


class Tripwire:
    """A forward pre-hook on the last layer that counts its calls and raises ``exc`` at call
    ``at`` (the test's own hook: removed on exit, before the model is checked)."""

    def __init__(self, model, exc: BaseException = None, at: int = None):
        self.model, self.exc, self.at, self.n = model, exc, at, 0

    def __call__(self, module, args):
        self.n += 1
        if self.exc is not None and self.n == self.at:
            raise self.exc

    def __enter__(self):
        self.handle = self.model.blocks[-1].register_forward_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


# --- the analyses -------------------------------------------------------------------------------
def _report(model, task, folder):
    from headlens.reporting.pipeline import report

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.txt").write_text("\n".join(TEXTS) + "\n")
    report(model, task=str(folder / "task.txt"), out=folder / "report", n_examples=6, n_bootstrap=20,
           batch_size=4, n_clusters=3, progress=False)


def _sweep(kind, method):
    return lambda m, t, f: ablation_sweep(m, t, kind, method=method, batch_size=2, n_bootstrap=20,
                                          progress=False, resume_dir=f / "checkpoints")


ANALYSES = {
    "capture_patterns": lambda m, t, f: capture_patterns(m, TEXTS, batch_size=2),
    "stream_head_stats": lambda m, t, f: stream_head_stats(m, TEXTS, {"text": text_statistics(m)}, batch_size=2,
                                                           n_replicates=3),
    "pattern_scores": lambda m, t, f: pattern_scores(m, TEXTS, batch_size=2, n_probe=4, probe_len=5),
    "HeadClusterer.fit": lambda m, t, f: HeadClusterer(n_clusters=3, n_bootstrap=3, batch_size=2).fit(m, TEXTS),
    **{f"ablation_sweep-{kind}-{method}": _sweep(kind, method)
       for kind in ("zero", "mean", "resample", "uniform") for method in ("fast", "naive")},
    "ablate": lambda m, t, f: ablate(m, t, [(0, 1), (2, 3)], "mean", batch_size=2),
    "gradient_importance": lambda m, t, f: gradient_importance(m, t, batch_size=2),
    "attribution_patching-mean": lambda m, t, f: attribution_patching(m, t, "mean", batch_size=2),
    "attribution_patching-corrupted": lambda m, t, f: attribution_patching(m, load_task("ioi", m, n_examples=4),
                                                                           batch_size=2),
    "pruning_curve": lambda m, t, f: pruning_curve(m, t, batch_size=2, n_random=1, step=0.25, progress=False),
    "report": _report,
}
SLOW = {"report"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ANALYSES])
def test_analysis_leaves_the_model_untouched(name, model, tmp_path):
    task = LMLossTask(TEXTS)
    before = snapshot(model)
    with Tripwire(model) as count:
        ANALYSES[name](model, task, tmp_path / "clean")
    assert_untouched(model, before)
    assert count.n >= 2, "the analysis should run the model"
    failures = [KeyboardInterrupt()] if name in SLOW else [RuntimeError("failed midway"), KeyboardInterrupt()]
    for exc in failures:
        with Tripwire(model, exc, at=count.n // 2 + 1) as trip, pytest.raises(type(exc)):
            ANALYSES[name](model, task, tmp_path / type(exc).__name__)
        assert trip.n == count.n // 2 + 1  # it stopped where the tripwire fired
        assert_untouched(model, before)


def flaky_task(exc: BaseException, fail_at: int = 3) -> CallableTask:
    """A differentiable metric that raises ``exc`` on its ``fail_at``-th call."""
    calls = {"n": 0}

    def metric(logits, inputs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise exc
        return logits[:, -1, :8].logsumexp(-1)

    return CallableTask(TEXTS, metric, metric_name="flaky")


TASK_ANALYSES = ["ablation_sweep-zero-fast", "ablation_sweep-resample-naive", "ablate", "gradient_importance",
                 "attribution_patching-mean", "pruning_curve"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("metric failed")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("name", TASK_ANALYSES)
def test_a_metric_that_raises_leaves_the_model_untouched(name, exc, model, tmp_path):
    before = snapshot(model)
    with pytest.raises(type(exc)):
        ANALYSES[name](model, flaky_task(exc), tmp_path)
    assert_untouched(model, before)


def test_prune_heads_leaves_the_source_untouched(model, monkeypatch):
    before = snapshot(model)
    pruned = prune_heads(model, {0: [1], 2: [0, 3]})
    assert pruned.cfg.kept_heads == [[0, 2, 3], [0, 1, 2, 3], [1, 2]]
    with torch.no_grad():
        next(pruned.parameters()).add_(1.0)  # the result shares no tensor with the source
    assert_untouched(model, before)
    with pytest.raises(HeadlensError, match="out of range"):
        prune_heads(model, {0: [1], 2: [0, 9]})
    assert_untouched(model, before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HeadlensModel, "from_state_dict", interrupted)  # Ctrl-C after the weights are sliced
    with pytest.raises(KeyboardInterrupt):
        prune_heads(model, {1: [0, 1, 2, 3]})
    monkeypatch.undo()
    assert_untouched(model, before)


def test_bad_input_leaves_the_model_untouched(model):
    before = snapshot(model)
    with pytest.raises(HeadlensError):
        ablation_sweep(model, LMLossTask(TEXTS), heads=[(0, 1), (1, 4)], progress=False)
    with pytest.raises(HeadlensError):
        gradient_importance(model, LMLossTask(TEXTS), head_mask=torch.full((3, 4), float("nan")))
    with pytest.raises(HeadlensError):
        model(torch.tensor([[1, 2, 3]]), head_gate=torch.ones(3, 2))
    assert_untouched(model, before)


# --- the check can fail -------------------------------------------------------------------------
def _damage(model, kind: str):
    """Break one property; returns a function that repairs it."""
    p = model.blocks[0].attn.W_Q
    if kind == "hook point":
        model.blocks[1].attn.hook_z.add_hook(lambda t, hook: t)
        return lambda: model.reset_hooks(including_permanent=True)
    if kind == "torch hook":
        handle = model.blocks[0].register_forward_hook(lambda *a: None)
        return handle.remove
    if kind == "weight":
        old = p.data.clone()
        p.data[0, 0, 0] += 1e-7
        return lambda: p.data.copy_(old)
    if kind == "grad":
        p.grad = torch.zeros_like(p)
        return lambda: setattr(p, "grad", None)
    if kind == "requires_grad":
        p.requires_grad_(False)
        return lambda: p.requires_grad_(True)
    if kind == "training":
        model.eval()
        return lambda: model.train()
    if kind == "config":
        old = model.cfg.name
        model.cfg.name = "renamed"
        return lambda: setattr(model.cfg, "name", old)
    if kind == "global rng":
        state = torch.random.get_rng_state()
        torch.rand(1)
        return lambda: torch.random.set_rng_state(state)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["hook point", "torch hook", "weight", "grad", "requires_grad", "training",
                                  "config", "global rng"])
def test_the_checker_sees_every_kind_of_change(model, kind):
    before = snapshot(model)
    repair = _damage(model, kind)
    try:
        with pytest.raises(AssertionError):
            assert_untouched(model, before)
    finally:
        repair()
    assert_untouched(model, before)

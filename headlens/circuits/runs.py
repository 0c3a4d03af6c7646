"""What every circuit analysis shares: a task's clean and corrupted batches, caches of one run,
the task metric read from a residual stream, copies of a batch stacked for batched interventions,
and bootstrap intervals over examples.

Conventions (shapes as in :mod:`headlens.circuits`): the *clean* input is the task's own, the
*corrupted* input its counterfactual (``TaskBatch.corrupted``, same length per example). The metric
of any run is always computed against the clean batch's targets, as TransformerLens' patching
metrics are. ``direction="denoise"`` runs the corrupted input and puts clean values in
(TransformerLens' ``patching`` default); ``"noise"`` runs the clean input and puts corrupted
values in (Wang et al.'s path patching, Hanna et al.'s edge attribution).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.stats import bootstrap

from headlens.errors import HeadlensError, check
from headlens.importance.tasks import load_task

DIRECTIONS = ("denoise", "noise")


# --- the task's batches ------------------------------------------------------------------------
def circuit_batches(model, task, batch_size: int = 16, analysis: str = "this analysis") -> tuple:
    """``(task, batches)`` with every batch carrying its corrupted inputs."""
    task = load_task(task, model)
    batches = task.batches(model, batch_size)
    if batches[0].corrupted is None:
        raise HeadlensError(
            f"{analysis} needs a task with corrupted (counterfactual) inputs; task {task.name!r} has none: "
            "use a contrast task with 'corrupted' prompts (e.g. the bundled 'ioi') or "
            "headlens.circuits.induction_task for repeated random tokens")
    return task, batches


def split_inputs(batch, direction: str) -> tuple[dict, dict]:
    """``(base, source)`` inputs: the run that is intervened on and the run its values come from."""
    check(direction in DIRECTIONS, f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return (batch.corrupted, batch.inputs) if direction == "denoise" else (batch.inputs, batch.corrupted)


def check_additive(model, analysis: str) -> None:
    """Refuse models whose residual stream is not a sum of component outputs (post-norm BERT)."""
    if model.cfg.norm_position != "pre" or model.cfg.embed_norm:
        raise HeadlensError(
            f"{analysis} reads the residual stream as a sum of head, MLP and embedding outputs; "
            f"{model.cfg.name!r} normalises after each sublayer (post-norm), so no such sum exists: "
            "use a pre-norm model (GPT-2, LLaMA, Qwen2, Mistral, GPT-NeoX, the toys)")


# --- one run -----------------------------------------------------------------------------------
@torch.no_grad()
def capture(model, inputs: Optional[dict], names, residual: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None) -> dict:
    """Run the model once (from ``inputs``, or from ``residual`` entering layer 0) and keep the
    activations of the hook points ``names``: ``{name: tensor}``."""
    keep = {}

    def save(t, hook):
        keep[hook.name] = t.detach().clone()

    hooks = [(name, save) for name in names]
    with model.hooks(fwd_hooks=hooks):
        if residual is None:
            model(inputs, return_type=None)
        else:
            model(residual=residual, attention_mask=attention_mask, return_type=None)
    return keep


def head_outputs(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write into the residual stream, ``z [R, P, H, d] -> [R, P, H, D]`` (no ``b_O``)."""
    W_O = model.blocks[layer].attn.W_O
    return torch.einsum("rphd,hdD->rphD", z, W_O.to(z.dtype))


def final_hidden(model, resid: torch.Tensor) -> torch.Tensor:
    """The final residual stream ``[R, P, D]`` through the final norm: what the output head reads."""
    return model.ln_final(resid) if model.ln_final is not None else resid


def metric_of(model, task, batch, hidden: torch.Tensor, copies: int = 1, reference=None) -> torch.Tensor:
    """The task metric ``[copies, B]`` of ``copies`` stacked runs of ``batch`` (``hidden [copies * R, P, D]``,
    final hidden states), each against the clean batch's targets."""
    R = batch.n_rows
    return torch.stack([task.compute(model, hidden[c * R:(c + 1) * R], batch, reference).double()
                        for c in range(copies)])


def repeat_mask(batch, copies: int) -> torch.Tensor:
    return batch.inputs["attention_mask"].repeat(copies, 1)


def copies_per_chunk(model, rows: int, P: int, budget_mb: float, n: int) -> int:
    """How many stacked copies of a ``rows x P`` batch fit in ``budget_mb`` (a rough activation estimate)."""
    cfg = model.cfg
    per_row = 4 * P * (8 * cfg.d_model + 3 * max(cfg.d_mlp, 1) + 3 * cfg.n_heads * P)
    return int(max(1, min(n, budget_mb * 2**20 // (rows * per_row))))


# --- statistics --------------------------------------------------------------------------------
def mean_ci(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the last axis of ``values [..., N]`` and its 95% percentile-bootstrap interval over
    examples (NaN without resamples or with one example; the point itself when there is no spread)."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(-1)
    low = np.full(mean.shape, np.nan)
    high = np.full(mean.shape, np.nan)
    if n_bootstrap > 0 and values.shape[-1] > 1 and values.size:
        flat = values.reshape(-1, values.shape[-1])
        res = bootstrap((flat,), np.mean, axis=-1, vectorized=True, n_resamples=n_bootstrap,
                        method="percentile", random_state=np.random.default_rng(seed))
        const = np.ptp(flat, axis=-1) == 0
        low = np.where(const, flat[:, 0], res.confidence_interval.low).reshape(mean.shape)
        high = np.where(const, flat[:, 0], res.confidence_interval.high).reshape(mean.shape)
    return mean, low, high


def recovered(metric: np.ndarray, clean: np.ndarray, corrupted: np.ndarray, n_bootstrap: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:
    """``(mean(metric) - mean(corrupted)) / (mean(clean) - mean(corrupted))`` over examples (each ``[N]``,
    paired) and its 95% paired-bootstrap interval: the fraction of the clean - corrupted gap a run keeps."""
    def stat(m, c, k, axis=-1):
        return (m.mean(axis) - k.mean(axis)) / (c.mean(axis) - k.mean(axis))

    arrays = [np.asarray(a, dtype=np.float64) for a in (metric, clean, corrupted)]
    point = float(stat(*arrays))
    if n_bootstrap <= 0 or len(arrays[0]) < 2:
        return point, float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        res = bootstrap(arrays, stat, paired=True, vectorized=True, n_resamples=n_bootstrap,
                        method="percentile", random_state=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


@torch.no_grad()
def metric_gap(model, task, batch_size: int = 16, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The task metric on the clean and the corrupted inputs: ``name, metric, higher_is_better,
    n_examples, clean, corrupted`` (means) and ``gap, gap_low, gap_high`` (clean - corrupted, 95% CI)."""
    task, batches = circuit_batches(model, task, batch_size, "a circuit analysis")
    clean, corrupted = [], []
    for batch in batches:
        ref = task.reference(model, batch)
        for inputs, keep in ((batch.inputs, clean), (batch.corrupted, corrupted)):
            keep.append(task.compute(model, model(inputs, return_type="hidden"), batch, ref).double().cpu())
    clean, corrupted = torch.cat(clean).numpy(), torch.cat(corrupted).numpy()
    gap, low, high = mean_ci((clean - corrupted)[None], n_bootstrap, seed)
    return dict(name=task.name, metric=task.metric_name, higher_is_better=bool(task.higher_is_better),
                n_examples=len(clean), clean=float(clean.mean()), corrupted=float(corrupted.mean()),
                gap=float(gap[0]), gap_low=float(low[0]), gap_high=float(high[0]))

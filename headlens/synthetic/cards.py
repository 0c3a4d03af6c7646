"""The model cards of the toy models: what each head does, measured with the library's own pattern
scores (:mod:`headlens.patterns.scores`), roles (:mod:`headlens.patterns.roles`) and zero ablation
(:mod:`headlens.importance.ablation`) on the toys' evaluation data.

Shapes: ``N`` sequences, ``P`` positions, ``T`` half length.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F

from headlens.errors import check
from headlens.files import atomic_write
from headlens.importance.ablation import ablate
from headlens.importance.tasks import CallableTask
from headlens.io.native import load_model, read_card, save_model
from headlens.model.transformer import HeadlensModel
from headlens.patterns.capture import PatternBatch, stream_head_stats
from headlens.patterns.roles import TARGETED, assign_roles
from headlens.patterns.scores import probe_statistics, scores_table, text_statistics
from headlens.synthetic.toys import EVAL_SEED, ToySpec, eval_tokens, readout_losses, task_metrics

CARD_SCORES = ("previous_token", "first_token", "self", "induction")  # score_<name> of patterns.scores
# The role rules of headlens.patterns.roles, with the induction bar the toys' cards state.
ROLE_THRESHOLDS = {"induction": 0.3}


def head_attention(model: HeadlensModel, tokens: torch.Tensor, half_len: int) -> pd.DataFrame:
    """Per-head pattern scores on ``[BOS?, x, x]`` ``tokens [N, P]``, by the library's own
    statistics (:func:`headlens.patterns.scores.text_statistics` and ``probe_statistics``).

    Columns: ``layer, head``, every ``score_*`` column of :func:`headlens.patterns.scores.pattern_scores`
    (the induction and duplicate-token scores read on ``tokens`` itself), the card's short names
    ``previous_token, first_token, self, induction`` and their values under uniform causal
    attention (``*_chance``).
    """
    check(tokens.ndim == 2 and tokens.shape[1] >= 2 * half_len,
          f"tokens must be [N, P] holding two copies of length half_len={half_len}")
    start = tokens.shape[1] - 2 * half_len
    stats = {"text": text_statistics(model), "probe": probe_statistics(start, half_len)}
    acc = stream_head_stats(model, tokens.tolist(), stats, batch_size=64, sort_by_length=False)
    table = scores_table(model, acc.means())
    chance = _uniform_scores(model, tokens[:1], stats)
    for name in CARD_SCORES:
        table[name] = table[f"score_{name}"]
        table[f"{name}_chance"] = chance[f"score_{name}"]
    return table


def _uniform_scores(model: HeadlensModel, tokens: torch.Tensor, stats: dict) -> dict:
    """The statistics ``stats`` of uniform causal attention on ``tokens [1, P]`` (chance levels)."""
    P = tokens.shape[1]
    uniform = torch.tril(torch.ones(P, P)) / torch.arange(1, P + 1)[:, None]
    pb = PatternBatch(tokens, torch.ones_like(tokens), uniform[None, None], heads=[(0, 0)], causal=True,
                      layer_sizes=[1])
    out = {}
    for fn in stats.values():
        for name, (totals, counts) in fn(pb).items():
            out[name] = float(totals.sum() / counts.sum()) if counts.sum() > 0 else float("nan")
    return out


def card_tasks(task: str, tokens: torch.Tensor, half_len: int) -> dict:
    """The losses a card reports, as headlens tasks (one value per sequence): ``{loss name: Task}``,
    the two halves of ``[BOS?, x, x]`` (induction) or the two read-outs (first-token)."""
    rows = tokens.tolist()
    if task == "induction":
        prefix = tokens.shape[1] - 2 * half_len

        def half(offset):
            def loss(logits, inputs):
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), inputs["input_ids"][:, 1:], reduction="none")
                return nll[:, prefix + offset: prefix + offset + half_len - 1].mean(1)
            return loss

        return {"loss_first_half": CallableTask(rows, half(0), higher_is_better=False, max_tokens=tokens.shape[1]),
                "loss_repeated_half": CallableTask(rows, half(half_len), higher_is_better=False,
                                                   max_tokens=tokens.shape[1])}

    def readout(name):
        return lambda logits, inputs: readout_losses(logits, inputs["input_ids"])[name].mean(1)

    return {f"loss_{name}": CallableTask(rows, readout(name), higher_is_better=False, max_tokens=tokens.shape[1])
            for name in ("first_token", "previous_token")}


def head_ablations(model: HeadlensModel, task: str, tokens: torch.Tensor, half_len: int) -> pd.DataFrame:
    """The card's losses with each head zero-ablated alone (:func:`headlens.importance.ablate`): one
    row per head, ``layer, head`` then one ``ablated_<loss>`` column per loss of :func:`card_tasks`."""
    tasks = card_tasks(task, tokens, half_len)
    rows = []
    for layer, head in model.head_labels():
        rows.append({"layer": layer, "head": head,
                     **{f"ablated_{name}": float(ablate(model, t, (layer, head), "zero", batch_size=len(tokens)).mean())
                        for name, t in tasks.items()}})
    return pd.DataFrame(rows)


def known_roles(heads: pd.DataFrame) -> pd.Series:
    """One role per head by :func:`headlens.patterns.roles.assign_roles` (the library's rules and
    names, with :data:`ROLE_THRESHOLDS`)."""
    return assign_roles(heads, **ROLE_THRESHOLDS)["role"]


def measure(model: HeadlensModel, task: Optional[str] = None) -> tuple[pd.DataFrame, dict]:
    """Everything a card states about ``model``: per-head table (attention scores, chance levels,
    role, ablated losses) and the clean losses on the evaluation data."""
    task = task or ("induction" if model.cfg.bos_token_id is not None else "first-token")
    n_tokens = model.cfg.vocab_size // 2 if task == "first-token" else None
    tokens, half_len = eval_tokens(model, n_tokens=n_tokens)
    scores = head_attention(model, tokens, half_len)
    heads = scores[["layer", "head"] + [c for name in CARD_SCORES for c in (name, f"{name}_chance")]].copy()
    heads["role"] = known_roles(scores).to_numpy()
    heads = heads.merge(head_ablations(model, task, tokens, half_len), on=["layer", "head"])
    metrics = task_metrics(model, task, tokens, half_len)
    n_drawn = n_tokens or (model.cfg.vocab_size - (model.cfg.bos_token_id is not None))
    metrics.update(half_len=half_len, n_seqs=len(tokens), log_n_tokens=math.log(n_drawn))
    return heads, metrics


def _rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def model_card(model: HeadlensModel, spec: ToySpec, seed: int, steps: int, threads: int,
               final_loss: float, train_seconds: float, train_cpu_seconds: float) -> dict:
    """The card of a trained toy model: task, config, recipe, losses, per-head scores and roles."""
    recipe = {k: v for k, v in asdict(spec).items() if k not in ("name", "task", "description", "steps")}
    card = {
        "name": spec.name,
        "task": spec.task,
        "description": spec.description,
        "config": model.cfg.to_dict(),
        "seed": seed,
        "steps": steps,
        "recipe": recipe,
        "reproduce": f"headlens train-toy --toy {spec.name[4:]} --seed {seed} --steps {steps} "
                     f"--threads {threads} --out DIR",
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "final_train_loss": round(final_loss, 4),
    }
    return dict(card, **measured_card(model, spec.task))


def measured_card(model: HeadlensModel, task: str) -> dict:
    """The measured part of a card (``eval``, ``role_thresholds``, ``heads``, ``roles``); also what
    :func:`remeasure` rewrites when the measurements change but the weights do not."""
    heads, metrics = measure(model, task)
    return {
        "eval": dict(_rounded(metrics), seed=EVAL_SEED,
                     data="[BOS?, x, x] with x uniform random tokens (headlens.synthetic.toys.eval_tokens)"),
        "role_thresholds": ROLE_THRESHOLDS,
        "heads": [_rounded(row) for row in heads.to_dict("records")],
        "roles": {role: [[int(r.layer), int(r.head)] for r in heads.itertuples() if r.role == role]
                  for role in sorted(set(heads["role"])) if role in TARGETED_ROLES},
    }


def remeasure(folder) -> dict:
    """Re-measure the toy model saved in ``folder`` and rewrite its ``card.json`` / ``card.md``,
    keeping the training record (seed, steps, timings); the weights are not touched."""
    model, card = load_model(folder), read_card(folder)
    card = dict(card, config=model.cfg.to_dict(), **measured_card(model, card["task"]))
    write_card(folder, card)
    return card


ROLE_TEXT = {"previous-token": "attends to the previous token", "induction": "induction head: attends "
             "to the token after the previous occurrence of the current token",
             "first-token sink": "attends to the first token"}
TARGETED_ROLES = {label for label, _, _ in TARGETED}


def card_markdown(card: dict) -> str:
    """Human-readable model card (``card.md``) from :func:`model_card`'s dict."""
    ev = card["eval"]
    losses = ", ".join(f"{k} = {v}" for k, v in ev.items() if k.startswith(("loss", "accuracy")))
    lines = [
        f"# {card['name']}", "", card["description"], "",
        f"- task: `{card['task']}`; seed {card['seed']}; {card['steps']} steps of batch "
        f"{card['recipe']['batch_size']} (AdamW lr {card['recipe']['lr']}, cosine); trained in "
        f"{card['train_seconds']} s ({card['train_cpu_seconds']} s CPU, {card['torch_threads']} thread, "
        f"torch {card['torch_version']}); final training loss {card['final_train_loss']}",
        f"- architecture: {card['config']['n_layers']} layer(s) x {card['config']['n_heads']} heads, "
        f"d_model {card['config']['d_model']}, attention only, pre-LayerNorm, learned positions, "
        f"vocabulary {card['config']['vocab_size']}, context {card['config']['n_ctx']}, "
        f"BOS id {card['config']['bos_token_id']}",
        f"- evaluation on {ev['n_seqs']} sequences [BOS?, x, x], half length {ev['half_len']} "
        f"(seed {ev['seed']}): {losses}; log(#tokens) = {ev['log_n_tokens']}",
        f"- reproduce: `{card['reproduce']}`", "",
        "## Heads", "",
        "Pattern scores (headlens.patterns.scores) on the evaluation data, roles by headlens.patterns.roles "
        "(chance = uniform causal attention). `ablated ...` = the loss with that head zero-ablated "
        "(headlens.importance.ablate).", "",
    ]
    ablated = [k for k in card["heads"][0] if k.startswith("ablated_")]
    cols = ["previous_token", "first_token", "self", "induction"]
    lines.append("| layer | head | role | " + " | ".join(c.replace("_", " ") for c in cols + ablated) + " |")
    lines.append("|" + "---|" * (3 + len(cols) + len(ablated)))
    for h in card["heads"]:
        cells = [str(h["layer"]), str(h["head"]), h["role"]] + [f"{h[c]:.3f}" for c in cols + ablated]
        lines.append("| " + " | ".join(cells) + " |")
    chance = card["heads"][0]
    lines += ["", "Chance levels: " + ", ".join(f"{c.replace('_', ' ')} {chance[c + '_chance']:.3f}" for c in cols),
              "", "## Known roles", ""]
    for role, heads in card["roles"].items():
        lines.append(f"- {role} ({ROLE_TEXT.get(role, role)}): " + ", ".join(f"L{l}H{h}" for l, h in heads))
    if not card["roles"]:
        lines.append("- none: no head has a targeted role (thresholds of headlens.patterns.roles, with "
                     + str(card["role_thresholds"]) + ")")
    return "\n".join(lines) + "\n"


def save_toy(model: HeadlensModel, card: dict, folder, overwrite: bool = False):
    """Write a trained toy model with its ``card.json`` and ``card.md`` (a headlens checkpoint) into
    a new or empty ``folder`` (``overwrite``: replace its contents)."""
    return save_model(model, folder, card=card, card_md=card_markdown(card), overwrite=overwrite)


def write_card(folder, card: dict) -> None:
    """Write ``card.json`` and ``card.md`` of a toy model folder, atomically."""
    folder = Path(folder)
    atomic_write(folder / "card.json", (json.dumps(card, indent=2, sort_keys=True)).encode())
    atomic_write(folder / "card.md", card_markdown(card).encode())

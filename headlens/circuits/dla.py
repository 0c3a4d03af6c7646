"""Direct logit attribution (Elhage et al. 2021; TransformerLens ``ActivationCache.logit_attrs`` with
``apply_ln_to_stack``): what each head writes straight into the logit difference.

The final residual stream at the answer position is a sum of components: the token and position
embeddings, every head's ``z_h W_O^h``, every layer's attention bias ``b_O`` and MLP output. With the
final norm's scale frozen at the clean run's value ``s`` (LayerNorm: ``x -> (x - mean x) / s * w + b``;
RMSNorm: ``x -> x / s * w``), each component ``c`` contributes ``c . e`` to the logit difference, with
``e = w * u / s`` (centred over ``D`` for LayerNorm) and ``u = W_U[:, right] - W_U[:, wrong]``, where
``wrong`` is the wrong answer with the largest clean logit (the one the task's metric subtracts). The
*rest* (the final norm's bias and the unembedding bias) closes the sum: components plus rest equal
the model's own logit difference up to float rounding (``reconstruction_error_``).

A head's attribution splits exactly over the key positions it reads:
``sum_s A[pos, s] (v_s W_O^h) . e``; the positions table aggregates it by offset from the answer
position, and ``from_right`` / ``from_wrong`` add up what a head reads from positions holding the
right / the wrong answer token (a name mover copies the right name from where it occurs).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from headlens.circuits.runs import capture, check_additive, final_hidden, mean_ci
from headlens.errors import HeadlensError
from headlens.importance.tasks import ContrastTask, load_task
from headlens.importance.tasks.base import logits_from_hidden


def _unembedding(model) -> torch.Tensor:
    return model.W_E.T if model.cfg.tie_embeddings else model.unembed.W_U


def logit_direction(model, x: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> tuple:
    """``x [B, D]`` final residual at the answer positions -> ``(e [B, D], rest [B])``: the frozen-norm
    direction a component is dotted with, and the bias terms of the logit difference."""
    W_U = _unembedding(model)
    u = W_U[:, right].T - W_U[:, wrong].T  # [B, D]
    norm = model.ln_final
    rest = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if model.unembed.b_U is not None:
        rest = rest + model.unembed.b_U[right] - model.unembed.b_U[wrong]
    if norm is None:
        return u, rest
    w = norm.weight
    if model.cfg.norm == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        wu = w * u
        if norm.bias is not None:
            rest = rest + (norm.bias * u).sum(-1)
        return (wu - wu.mean(-1, keepdim=True)) / scale, rest
    scale = (x.float().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt().to(x.dtype)
    return w * u / scale, rest


class LogitAttribution:
    """Direct logit attribution of every head on a contrast task, with bootstrap CIs over examples.

    Parameters: ``batch_size``; ``n_bootstrap`` resamples (0: no intervals); ``seed``.

    Learned attributes: ``heads_`` (one row per head: ``layer, head, attribution, ci_low, ci_high,
    from_right, from_wrong``), ``positions_`` (``layer, head, offset, attribution, ci_low, ci_high,
    n_examples``; ``offset`` = key position - answer position), ``components_`` (``component, layer,
    attribution, ci_low, ci_high``: embeddings, heads summed per layer, attention biases, MLPs and
    the rest), ``per_example_`` (``[n_heads, N]``), ``metric_`` (``[N]``, the model's logit
    difference) and ``reconstruction_error_`` (max over examples of |components + rest - metric|).
    """

    def __init__(self, batch_size: int = 16, n_bootstrap: int = 1000, seed: int = 0):
        self.batch_size, self.n_bootstrap, self.seed = batch_size, n_bootstrap, seed

    @torch.no_grad()
    def fit(self, model, task) -> "LogitAttribution":
        check_additive(model, "direct logit attribution")
        task = load_task(task, model)
        if not isinstance(task, ContrastTask) or model.unembed is None or model.cfg.unembed != "lm":
            raise HeadlensError(f"direct logit attribution needs a contrast task (right and wrong answer tokens) "
                                f"on a model with an output head; got {type(task).__name__} on {model.cfg.name!r}")
        L = model.cfg.n_layers
        names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"]
        names += ["hook_pos_embed"] if model.cfg.positional == "learned" else []
        names += [f"blocks.{layer}.attn.{n}" for layer in range(L) for n in ("hook_z", "hook_v", "hook_pattern")]
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(L) if model.blocks[layer].mlp is not None]
        labels = model.head_labels()
        heads, right_part, wrong_part, comps, metric, pos_rows = [], [], [], [], [], []
        for batch in task.batches(model, self.batch_size):
            cache = capture(model, batch.inputs, names)
            t, rows = batch.targets, torch.arange(batch.n_rows, device=model.device)
            pos = t["pos"]
            x = cache[f"blocks.{L - 1}.hook_resid_post"][rows, pos]  # [B, D]
            logits = logits_from_hidden(model, final_hidden(model, x))
            wrong_logits = logits.gather(1, t["wrong"])
            wrong = t["wrong"].gather(1, wrong_logits.argmax(1, keepdim=True))[:, 0]
            metric.append((logits.gather(1, t["right"][:, None])[:, 0] - wrong_logits.max(1).values).double())
            e, rest = logit_direction(model, x, t["right"], wrong)
            parts = {("embed", -1): cache["hook_embed"][rows, pos]}
            if model.cfg.positional == "learned":
                parts[("pos_embed", -1)] = cache["hook_pos_embed"][rows, pos]
            ids = batch.inputs["input_ids"]
            b_heads, b_right, b_wrong = [], [], []
            for layer in range(L):
                attn = model.blocks[layer].attn
                pattern = cache[f"blocks.{layer}.attn.hook_pattern"][rows, :, pos]  # [B, H, S]
                v = cache[f"blocks.{layer}.attn.hook_v"].index_select(2, attn.kv_map)  # [B, S, H, d]
                read = torch.einsum("hdD,bD->bhd", attn.W_O, e)
                by_key = pattern * torch.einsum("bshd,bhd->bhs", v, read)  # [B, H, S]
                b_heads.append(by_key)
                b_right.append((by_key * (ids == t["right"][:, None])[:, None]).sum(-1))
                b_wrong.append((by_key * (ids == wrong[:, None])[:, None]).sum(-1))
                if attn.b_O is not None:
                    parts[("attn_bias", layer)] = attn.b_O.expand_as(x)
                if model.blocks[layer].mlp is not None:
                    parts[("mlp", layer)] = cache[f"blocks.{layer}.hook_mlp_out"][rows, pos]
            by_key = torch.cat(b_heads, 1)  # [B, n_heads, S]
            heads.append(by_key.sum(-1).double())
            right_part.append(torch.cat(b_right, 1).double())
            wrong_part.append(torch.cat(b_wrong, 1).double())
            pos_rows.append((by_key.double().cpu(), pos.cpu()))
            values = {k: (v * e).sum(-1).double() for k, v in parts.items()}
            values[("rest", -1)] = rest.double()
            comps.append(values)
        self._finish(labels, heads, right_part, wrong_part, comps, metric, pos_rows)
        return self

    def _finish(self, labels, heads, right_part, wrong_part, comps, metric, pos_rows) -> None:
        per_head = torch.cat(heads).T.cpu().numpy()  # [n_heads, N]
        self.per_example_, self.metric_ = per_head, torch.cat(metric).cpu().numpy()
        mean, low, high = mean_ci(per_head, self.n_bootstrap, self.seed)
        self.heads_ = pd.DataFrame({
            "layer": [layer for layer, _ in labels], "head": [h for _, h in labels], "attribution": mean,
            "ci_low": low, "ci_high": high,
            "from_right": torch.cat(right_part).mean(0).cpu().numpy(),
            "from_wrong": torch.cat(wrong_part).mean(0).cpu().numpy(),
        }).sort_values(["layer", "head"], ignore_index=True)
        keys = list(comps[0])
        comp = {k: torch.cat([c[k] for c in comps]).cpu().numpy() for k in keys}
        layers = sorted({layer for layer, _ in labels})
        for layer in layers:
            idx = [i for i, (ll, _) in enumerate(labels) if ll == layer]
            comp[("heads", layer)] = per_head[idx].sum(0)
        total = sum(comp.values())
        self.reconstruction_error_ = float(np.abs(total - self.metric_).max())
        kinds = ["embed", "pos_embed", "heads", "attn_bias", "mlp", "rest"]
        order = sorted(comp, key=lambda k: (k[1], kinds.index(k[0])))
        mean, low, high = mean_ci(np.stack([comp[k] for k in order]), self.n_bootstrap, self.seed)
        self.components_ = pd.DataFrame({"component": [k[0] for k in order], "layer": [k[1] for k in order],
                                         "attribution": mean, "ci_low": low, "ci_high": high})
        self.positions_ = self._positions(labels, pos_rows)
        for table in (self.heads_, self.components_, self.positions_):
            table.attrs.update(metric="logit_diff", reconstruction_error=self.reconstruction_error_,
                               method="direct logit attribution, final norm scale frozen at the clean run")

    def _positions(self, labels, pos_rows) -> pd.DataFrame:
        """Per head and offset from the answer position: the mean over the examples that have it."""
        frames = []
        S = max(by_key.shape[-1] for by_key, _ in pos_rows)
        for offset in range(-(S - 1), 1):
            vals = [by_key[torch.arange(len(pos)), :, pos + offset][pos + offset >= 0]
                    for by_key, pos in pos_rows]
            vals = torch.cat(vals)  # [n, n_heads]
            if len(vals) == 0:
                continue
            mean, low, high = mean_ci(vals.T.numpy(), self.n_bootstrap, self.seed)
            frames.append(pd.DataFrame({"layer": [layer for layer, _ in labels], "head": [h for _, h in labels],
                                        "offset": offset, "attribution": mean, "ci_low": low, "ci_high": high,
                                        "n_examples": len(vals)}))
        return pd.concat(frames).sort_values(["layer", "head", "offset"], ignore_index=True)

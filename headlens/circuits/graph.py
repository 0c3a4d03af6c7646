"""The residual-stream graph of a pre-norm transformer, and a forward pass in which every edge of
it can be patched on its own.

Senders write into the residual stream: the input embeddings (``input``), every head
(``l.h``, its ``z_h W_O^h``) and every MLP (``mlp{l}``). Receivers read it: every query head's
query input (``l.h<q>``), every key/value head's key and value inputs (``l.kv{j}<k>``, ``<v>``;
with multi-head attention key/value head ``j`` is query head ``j``), every MLP's input
(``mlp{l}``) and the logits (``logits``, the final residual stream). An edge joins a sender to
each receiver after it (a layer's heads feed its own MLP unless the block is parallel, as in
GPT-NeoX), as in TransformerLens' ``attribution_patching.enumerate_edges`` summed over positions.

:func:`graph_forward` runs the model with every receiver reading its own copy of the residual
stream, ``x_v = x - sum_u patched[u, v] (a_u - a_u,replacement) + tap_v``: with no patch and no tap
it is the ordinary forward; a patched edge makes ``v`` see ``u``'s replacement (e.g. corrupted)
output instead of its current one (Hanna et al. 2024's edge patching); ``tap_v`` (zeros) lets one
backward pass give ``dM / d x_v`` for every receiver. Since the residual stream is the sum of its
senders' outputs, ``x_v`` is also the replacement run's residual plus the kept edges' differences:
a circuit of few edges costs about one forward pass however large the graph. Each receiver's
q, k or v is computed from its own input with the layer's norm and weights (the model then
applies rotary); an MLP receiver's output is the layer's MLP on its own input.

Shapes: ``R`` rows, ``P`` positions, ``D`` d_model, ``n_s`` senders, ``n_r`` receivers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from headlens.circuits.runs import check_additive
from headlens.errors import check
from headlens.model.heads import head_label


@dataclass
class EdgeGraph:
    """Senders and receivers of a model, in forward order, and which edges exist.

    senders: ``(kind, layer, head)`` with kind ``input`` (layer -1), ``head`` or ``mlp`` (head -1);
    receivers: ``(via, layer, head)`` with via ``q`` (a query head), ``k`` / ``v`` (a key/value head),
    ``mlp`` (head -1) or ``logits`` (layer ``L``, head -1); ``allowed [n_s, n_r]``: the edges."""

    senders: list
    receivers: list
    allowed: torch.Tensor

    @classmethod
    def of(cls, model) -> "EdgeGraph":
        check_additive(model, "edge attribution")
        cfg, senders, receivers, slots = model.cfg, [("input", -1, -1)], [], []
        parallel = cfg.parallel_block
        for layer in range(cfg.n_layers):
            attn, has_mlp = model.blocks[layer].attn, model.blocks[layer].mlp is not None
            for via, ids in (("q", attn.head_ids), ("k", attn.kv_ids), ("v", attn.kv_ids)):
                receivers += [(via, layer, h) for h in ids]
                slots += [len(senders)] * len(ids)  # senders so far feed these receivers
            heads = [("head", layer, h) for h in attn.head_ids]
            if has_mlp and parallel:
                receivers.append(("mlp", layer, -1))
                slots.append(len(senders))
            senders += heads
            if has_mlp and not parallel:
                receivers.append(("mlp", layer, -1))
                slots.append(len(senders))
            if has_mlp:
                senders.append(("mlp", layer, -1))
        receivers.append(("logits", cfg.n_layers, -1))
        slots.append(len(senders))
        allowed = torch.arange(len(senders))[:, None] < torch.tensor(slots)[None, :]
        return cls(senders, receivers, allowed)

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    def sender_name(self, i: int) -> str:
        kind, layer, head = self.senders[i]
        return "input" if kind == "input" else head_label(layer, head) if kind == "head" else f"mlp{layer}"

    def receiver_name(self, j: int) -> str:
        via, layer, head = self.receivers[j]
        if via == "q":
            return f"{layer}.{head}<q>"
        if via in ("k", "v"):
            return f"{layer}.kv{head}<{via}>"
        return f"mlp{layer}" if via == "mlp" else "logits"

    def layer_receivers(self, layer: int) -> dict:
        """``{via: [receiver index]}`` of ``layer`` (``logits``: layer ``L``)."""
        if not hasattr(self, "_by_layer"):
            self._by_layer = {}
            for j, (via, ll, _) in enumerate(self.receivers):
                self._by_layer.setdefault(ll, {}).setdefault(via, []).append(j)
        return self._by_layer.get(layer, {})


def _project(attn, Y: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-head inputs ``Y [R, P, n, D]`` through each head's own slice of ``W [D, n, d]`` -> ``[R, P, n, d]``."""
    out = torch.einsum("rpnD,Dnd->rpnd", Y, W)
    return out + b if b is not None else out


@dataclass
class Trace:
    """What one :func:`graph_forward` leaves: every sender's output ``outputs [R, P, n_s, D]``, the
    residual stream at each read point (``reads``: ``("pre", l)`` entering layer ``l``, ``("mid", l)``
    entering its MLP, ``"final"``; each ``[R, P, D]``) and the zero taps ``{receiver: [R, P, D]}``."""

    outputs: torch.Tensor
    reads: dict
    taps: dict


class _GraphRun:
    """The hooks of one :func:`graph_forward` and the state they share."""

    def __init__(self, model, graph: EdgeGraph, R: int, P: int, patched, replacement: Optional[Trace], taps: bool,
                 dtype):
        self.model, self.graph, self.patched, self.replacement = model, graph, patched, replacement
        self.outputs = torch.zeros(R, P, len(graph.senders), model.cfg.d_model, dtype=dtype, device=model.device)
        self.index = {s: i for i, s in enumerate(graph.senders)}
        self.reads, self.taps = {}, {}
        if taps:
            self.taps = {j: torch.zeros(R, P, model.cfg.d_model, dtype=dtype, device=model.device, requires_grad=True)
                         for j in range(len(graph.receivers))}
        self.qkv, self.mid = {}, None

    def inputs(self, x: torch.Tensor, receivers: list, point) -> Optional[torch.Tensor]:
        """``[R, P, len(receivers), D]``: each receiver's own residual input, or None if all are ``x``.

        ``x`` is the sum of the outputs of every sender upstream of the read point (plus biases, the
        same in every run), and so is the replacement run's residual there; so ``x - sum_patched
        (a_u - c_u)`` equals ``x_repl + sum_kept (a_u - c_u)``, and the shorter sum is used."""
        self.reads[point] = x.detach()
        patched = self.patched is not None and bool(self.patched[:, receivers].any())
        if not patched and not self.taps:
            return None
        X = x[:, :, None].expand(-1, -1, len(receivers), -1)
        if patched:
            mask = self.patched[:, receivers]
            kept = self.graph.allowed[:, receivers].to(mask.device) & ~mask
            base, use, sign = (self.replacement.reads[point], kept, 1.0) if kept.sum() < mask.sum() else (x, mask, -1.0)
            senders = use.any(1).nonzero()[:, 0]
            diff = self.outputs[:, :, senders] - self.replacement.outputs[:, :, senders]
            X = base[:, :, None] + sign * torch.einsum("rpsD,sn->rpnD", diff, use[senders].to(x.dtype))
        if self.taps:
            X = X + torch.stack([self.taps[j] for j in receivers], 2)
        return X

    def hooks(self) -> list:
        model, L = self.model, self.model.cfg.n_layers
        hooks = []
        for layer in range(L):
            block = model.blocks[layer]
            hooks.append((f"blocks.{layer}.hook_resid_pre", self._resid_pre(layer)))
            for via in ("q", "k", "v"):
                hooks.append((f"blocks.{layer}.attn.hook_{via}", self._use(layer, via)))
            hooks.append((f"blocks.{layer}.attn.hook_z", self._z(layer)))
            if block.mlp is not None:
                if not model.cfg.parallel_block:
                    hooks.append((f"blocks.{layer}.hook_resid_mid", self._mid))
                hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp(layer)))
        hooks.append((f"blocks.{L - 1}.hook_resid_post", self._final))
        return hooks

    def _resid_pre(self, layer: int):
        def hook(x, hook):
            if layer == 0:
                self.outputs[:, :, 0] = x.detach()
            self.mid = (("pre", layer), x)  # a parallel block's MLP reads the layer input
            block, mine = self.model.blocks[layer], self.graph.layer_receivers(layer)
            attn = block.attn
            weights = {"q": (attn.W_Q, attn.b_Q), "k": (attn.W_K, attn.b_K), "v": (attn.W_V, attn.b_V)}
            for via in ("q", "k", "v"):
                X = self.inputs(x, mine[via], ("pre", layer))
                if X is None:
                    self.qkv[(layer, via)] = None
                    continue
                # hook_q / hook_k / hook_v are the projections before any QK-norm and rotary
                self.qkv[(layer, via)] = _project(attn, block.ln1(X), *weights[via])
            return x
        return hook

    def _use(self, layer: int, via: str):
        def hook(t, hook):
            new = self.qkv.pop((layer, via), None)
            return t if new is None else new.to(t.dtype)
        return hook

    def _z(self, layer: int):
        def hook(z, hook):
            W_O = self.model.blocks[layer].attn.W_O
            start = self.index[("head", layer, self.model.blocks[layer].attn.head_ids[0])]
            self.outputs[:, :, start:start + W_O.shape[0]] = torch.einsum("rphd,hdD->rphD", z.detach(), W_O.detach())
            return z
        return hook

    def _mid(self, x, hook):
        self.mid = (("mid", int(hook.name.split(".")[1])), x)
        return x

    def _mlp(self, layer: int):
        def hook(out, hook):
            block = self.model.blocks[layer]
            point, x = self.mid
            X = self.inputs(x, self.graph.layer_receivers(layer)["mlp"], point)
            if X is not None:
                out = block.mlp(block.ln2(X[:, :, 0]))
            self.outputs[:, :, self.index[("mlp", layer, -1)]] = out.detach()
            return out
        return hook

    def _final(self, x, hook):
        X = self.inputs(x, [len(self.graph.receivers) - 1], "final")
        return x if X is None else X[:, :, 0]


def graph_forward(model, graph: EdgeGraph, inputs: Optional[dict] = None, residual: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, patched: Optional[torch.Tensor] = None,
                  replacement: Optional[Trace] = None, taps: bool = False) -> tuple[torch.Tensor, Trace]:
    """One forward with per-receiver inputs (see the module doc). ``inputs`` (a batch) or ``residual``
    (the embeddings ``[R, P, D]``, with ``attention_mask``); ``patched [n_s, n_r]`` (True: the edge takes
    its sender's output in ``replacement``, the :class:`Trace` of another run of the same shape).
    Returns the final hidden states ``[R, P, D]`` and this run's :class:`Trace` (with ``taps``: zeros
    added to every receiver's input, for gradients)."""
    if inputs is not None:
        ids = inputs["input_ids"]
        R, P, dtype = ids.shape[0], ids.shape[1], model.dtype
        attention_mask = inputs.get("attention_mask")
    else:
        R, P, dtype = residual.shape[0], residual.shape[1], residual.dtype
    if patched is not None:
        check(replacement is not None, "patched edges need the replacement run's trace")
        patched = patched.bool().to(model.device) & graph.allowed.to(model.device)
    run = _GraphRun(model, graph, R, P, patched, replacement, taps, dtype)
    with model.hooks(fwd_hooks=run.hooks()):
        if inputs is not None:
            hidden = model(inputs, return_type="hidden")
        else:
            hidden = model(residual=residual, attention_mask=attention_mask, return_type="hidden")
    return hidden, Trace(run.outputs, run.reads, run.taps)

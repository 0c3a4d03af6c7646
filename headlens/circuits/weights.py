"""Weight-based circuits (Elhage et al. 2021): each head's OV and QK circuits as low-rank
TransformerLens ``FactoredMatrix`` objects, Q-, K- and V-composition between every pair of heads in
different layers, OV copying scores, and the composition of random matrices of the same shapes.

The weights are processed as TransformerLens' ``enable_compatibility_mode()`` processes them, so the
numbers equal ``TransformerBridge.all_composition_scores`` and ``(W_E @ OV @ W_U).eigenvalues`` on the
same weights: each layer's norm weight is folded into the matrices that read it (``W_Q``, ``W_K``,
``W_V``; the final norm into ``W_U``); for LayerNorm models the reading matrices are centred over
``D`` (the norm removes the mean) and the writing ones (``W_O``, ``W_E``) too; ``W_U`` is centred over
the vocabulary. Key/value heads are repeated for the query heads that read them (GQA). Nothing of
size ``[V, V]`` or ``[D, D]`` per head is ever formed.

Composition of sender ``A`` (layer ``l1``) into receiver ``B`` (layer ``l2 > l1``), with
``OV = W_V W_O`` and ``QK = W_Q W_K^T`` as ``[D, D]`` maps of row vectors:
``Q: |OV_A QK_B|_F``, ``K: |OV_A QK_B^T|_F``, ``V: |OV_A OV_B|_F``, each over ``|OV_A|_F |.._B|_F``.
The baseline is the same score for independent standard-normal factors of the same shapes
(``D x d`` and ``d x D``; the score is scale-free), so ``baseline_p95`` is the score a head pair
exceeds by chance one time in twenty.

Copying score: eigenvalues ``lambda`` of ``W_E OV W_U`` (``[V, V]``; its non-zero eigenvalues are
those of the ``[d, d]`` product of the factors); ``copying_score = sum(Re lambda) / sum(|lambda|)``
(Elhage et al.'s summed form, in ``[-1, 1]``, positive for heads that copy the token they attend
to) and ``positive_fraction`` the share of eigenvalues with a positive real part (sign-counted).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.utilities.matrix import composition_scores as tl_composition_scores

from headlens.circuits.runs import check_additive
from headlens.errors import check

VIAS = ("q", "k", "v")


def _layernorm(model) -> bool:
    return model.cfg.norm == "layernorm"


def _centred(W: torch.Tensor, dim: int, on: bool) -> torch.Tensor:
    return W - W.mean(dim, keepdim=True) if on else W


def _norm_weight(norm, D: int, dtype) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    return torch.ones(D, dtype=dtype) if w is None else w.detach().to(dtype)


@torch.no_grad()
def head_weights(model, layer: int) -> dict:
    """Processed per-query-head weights of ``layer`` (float32 or float64, on the CPU):
    ``W_Q, W_K, W_V [H, D, d]`` (key/value heads repeated per query head), ``W_O [H, d, D]``."""
    block, attn = model.blocks[layer], model.blocks[layer].attn
    dtype = torch.promote_types(attn.W_Q.dtype, torch.float32)
    D = model.cfg.d_model
    w = _norm_weight(block.ln1, D, dtype).cpu()
    ln = _layernorm(model)
    kv = attn.kv_map.cpu()

    def reading(W):  # [D, n, d] -> [H or K, D, d], the norm weight folded in
        return _centred(w[None, :, None] * W.detach().to(dtype).cpu().permute(1, 0, 2), 1, ln)

    return dict(W_Q=reading(attn.W_Q), W_K=reading(attn.W_K)[kv], W_V=reading(attn.W_V)[kv],
                W_O=_centred(attn.W_O.detach().to(dtype).cpu(), -1, ln))


def ov_circuit(model, layer: int) -> FactoredMatrix:
    """The OV circuits of ``layer``'s heads, ``[H, D, D]`` as ``W_V [H, D, d] @ W_O [H, d, D]``."""
    w = head_weights(model, layer)
    return FactoredMatrix(w["W_V"], w["W_O"])


def qk_circuit(model, layer: int) -> FactoredMatrix:
    """The QK circuits of ``layer``'s heads, ``[H, D, D]`` as ``W_Q [H, D, d] @ W_K^T [H, d, D]``."""
    w = head_weights(model, layer)
    return FactoredMatrix(w["W_Q"], w["W_K"].transpose(-2, -1))


def _reader(model, layer: int, via: str) -> FactoredMatrix:
    if via == "q":
        return qk_circuit(model, layer)
    if via == "k":
        return qk_circuit(model, layer).T
    return ov_circuit(model, layer)


def _trace_composition(A1, B1, A2, B2) -> torch.Tensor:
    """``|A1 B1 A2 B2|_F / (|A1 B1|_F |A2 B2|_F)`` for batches of factors ``[n, D, d]`` / ``[n, d, D]``,
    through ``d x d`` Gram matrices only (``|A B|_F^2 = tr(A^T A B B^T)``)."""
    ga1, gb1 = A1.transpose(-1, -2) @ A1, B1 @ B1.transpose(-1, -2)
    ga2, gb2 = A2.transpose(-1, -2) @ A2, B2 @ B2.transpose(-1, -2)
    M = B1 @ A2
    num = torch.einsum("nij,njk,nkl,nil->n", ga1, M, gb2, M)
    den = torch.einsum("nij,nji->n", ga1, gb1) * torch.einsum("nij,nji->n", ga2, gb2)
    return (num / den).sqrt()


@torch.no_grad()
def random_composition(D: int, d: int, via: str, n_samples: int = 500, seed: int = 0,
                       chunk: int = 100) -> np.ndarray:
    """Composition scores ``[n_samples]`` of random matrices with a head's shapes (``D`` d_model,
    ``d`` d_head): sender ``W_V [D, d] W_O [d, D]``, receiver likewise, all entries i.i.d. N(0, 1)."""
    check(via in VIAS, f"via must be one of {VIAS}, got {via!r}")
    gen = torch.Generator().manual_seed(seed + VIAS.index(via))
    out = []
    for start in range(0, n_samples, chunk):
        n = min(chunk, n_samples - start)
        A1, B1, A2, B2 = (torch.randn(n, *shape, generator=gen, dtype=torch.float64)
                          for shape in ((D, d), (d, D), (D, d), (d, D)))
        if via == "k":  # the receiver's QK transposed
            A2, B2 = B2.transpose(-1, -2), A2.transpose(-1, -2)
        out.append(_trace_composition(A1, B1, A2, B2))
    return torch.cat(out).numpy()


def composition_scores(model, n_samples: int = 500, seed: int = 0) -> pd.DataFrame:
    """Q-, K- and V-composition of every head pair in different layers; one row per pair and path:
    ``sender_layer, sender_head, receiver_layer, receiver_head, via, score, baseline_mean,
    baseline_p95, ratio`` (score over the baseline mean). Empty for a one-layer model (nothing can
    compose); ``attrs["baseline"]`` holds the baseline samples per ``via``."""
    check_additive(model, "composition scores")
    D, d = model.cfg.d_model, model.cfg.d_head
    base = {via: random_composition(D, d, via, n_samples, seed) for via in VIAS}
    ov = {layer: ov_circuit(model, layer) for layer in range(model.cfg.n_layers)}
    rows = []
    for l2 in range(1, model.cfg.n_layers):
        heads2 = model.cfg.heads_in_layer(l2)
        for via in VIAS:
            right = _reader(model, l2, via)
            for l1 in range(l2):
                scores = tl_composition_scores(ov[l1], right, broadcast_dims=True)  # [H1, H2]
                for i, h1 in enumerate(model.cfg.heads_in_layer(l1)):
                    for j, h2 in enumerate(heads2):
                        rows.append((l1, h1, l2, h2, via, float(scores[i, j])))
    table = pd.DataFrame(rows, columns=["sender_layer", "sender_head", "receiver_layer", "receiver_head",
                                        "via", "score"])
    table["baseline_mean"] = table.via.map({v: float(s.mean()) for v, s in base.items()}).astype(float)
    table["baseline_p95"] = table.via.map({v: float(np.quantile(s, 0.95)) for v, s in base.items()}).astype(float)
    table["ratio"] = table.score / table.baseline_mean
    table = table.sort_values(["receiver_layer", "receiver_head", "via", "sender_layer", "sender_head"],
                              ignore_index=True)
    table.attrs.update(baseline={v: s.tolist() for v, s in base.items()}, n_samples=n_samples, seed=seed,
                       method="elhage2021 composition on TransformerLens-processed weights (norms folded)")
    return table


@torch.no_grad()
def _embed_unembed(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Processed ``W_E [V, D]`` and ``W_U [D, V]`` (final norm folded in, centred as TransformerLens does)."""
    dtype = torch.promote_types(model.dtype, torch.float32)
    ln = _layernorm(model)
    W_E = _centred(model.W_E.detach().to(dtype).cpu(), -1, ln)
    W_U = model.W_E.T if model.cfg.tie_embeddings else model.unembed.W_U
    w = _norm_weight(model.ln_final, model.cfg.d_model, dtype).cpu()
    W_U = w[:, None] * W_U.detach().to(dtype).cpu()
    return W_E, W_U - W_U.mean(-1, keepdim=True)


def full_ov_circuit(model, layer: int) -> FactoredMatrix:
    """``W_E OV W_U`` of ``layer``'s heads, ``[H, V, V]``, as factors ``[H, V, d] @ [H, d, V]``."""
    check(model.unembed is not None and model.cfg.unembed == "lm",
          "the full OV circuit needs a model whose logits are its final hidden state @ W_U")
    W_E, W_U = _embed_unembed(model)
    return W_E @ ov_circuit(model, layer) @ W_U


@torch.no_grad()
def copying_scores(model) -> pd.DataFrame:
    """OV copying per head: ``layer, head, copying_score, positive_fraction`` (see the module doc)."""
    check_additive(model, "copying scores")
    check(model.unembed is not None and model.cfg.unembed == "lm",
          "copying scores need a model whose logits are its final hidden state @ W_U")
    W_E, W_U = _embed_unembed(model)
    M = W_U @ W_E  # [D, D]: the factors' inner product, so that no [V, V] or [V, d] matrix is formed
    rows = []
    for layer in range(model.cfg.n_layers):
        w = head_weights(model, layer)
        evals = FactoredMatrix(w["W_V"], w["W_O"] @ M).eigenvalues  # [H, d]: those of W_E OV W_U
        score = evals.sum(-1).real / evals.abs().sum(-1)
        positive = (evals.real > 0).double().mean(-1)
        for i, head in enumerate(model.cfg.heads_in_layer(layer)):
            rows.append((layer, head, float(score[i]), float(positive[i])))
    table = pd.DataFrame(rows, columns=["layer", "head", "copying_score", "positive_fraction"])
    table.attrs.update(method="eigenvalues of W_E W_OV W_U: sum(Re) / sum(|.|) and the share with Re > 0")
    return table

"""Matrix-multiply FLOPs, counted analytically from the config and by torch's FlopCounterMode,
and the machine's measured matrix-multiply peak."""
from __future__ import annotations

import torch
from harness import median, race


def attention_flops(hl, B: int, P: int) -> float:
    """Matrix-multiply FLOPs of one attention sublayer on ``[B, P]``: QKV, QK^T, AV, W_O."""
    c = hl.cfg
    T, Hd = B * P, c.n_heads * c.d_head
    return 2 * T * c.d_model * 3 * Hd + 2 * 2 * B * c.n_heads * P * P * c.d_head + 2 * T * Hd * c.d_model


def block_flops(hl, B: int, P: int) -> float:
    """Matrix-multiply FLOPs of one layer on ``[B, P]``: attention, then the MLP."""
    c = hl.cfg
    return attention_flops(hl, B, P) + 2 * 2 * B * P * c.d_model * c.d_mlp


def unembed_flops(hl, rows: int) -> float:
    return 2 * rows * hl.cfg.d_model * hl.cfg.vocab_size


def forward_flops(hl, B: int, P: int, first_layer: int = 0, lm_loss: bool = True) -> float:
    """A forward from ``first_layer`` to the loss (unembedding on P-1 positions) or logits."""
    layers = hl.cfg.n_layers - first_layer
    return layers * block_flops(hl, B, P) + unembed_flops(hl, B * (P - 1 if lm_loss else P))


def sweep_flops(hl, B: int, P: int, kind: str) -> dict:
    """FLOPs of a single-head sweep over all heads, as each side runs it.

    TransformerLens loop: a clean forward (logits), for ``mean`` one more to cache ``z`` (the
    bridge computes the logits even with ``return_type=None``), then one full forward per head.
    headlens' fast sweep: a clean forward (loss on P-1 positions), one clean pass through every
    layer (it records the layer's ``z`` and attention output and steps the cached residual
    stream), and for a head of layer l its output change ``dz @ W_O[h]``, layer l's MLP, the
    layers l+1..L-1 and the loss (heads are stacked along the batch, which changes no FLOP count)."""
    c = hl.cfg
    L, H, blk = c.n_layers, c.n_heads, block_flops(hl, B, P)
    logits = forward_flops(hl, B, P, lm_loss=False)
    tl = logits * (2 if kind == "mean" else 1) + H * L * logits
    per_head = [forward_flops(hl, B, P, first_layer=layer) - attention_flops(hl, B, P)
                + 2 * B * P * c.d_head * c.d_model for layer in range(L)]
    fast = forward_flops(hl, B, P) + L * blk + H * sum(per_head)
    return {"transformer_lens_loop": tl, "headlens_fast": fast}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of torch's CPU flash attention (FlopCounterMode counts the GPU kernels only),
    counted over every query-key pair as the analytic count does."""
    B, H, P, d = query_shape
    return 2 * B * H * P * key_shape[-2] * (d + value_shape[-1])


def counted_flops(fn) -> float:
    """Matrix-multiply FLOPs ``fn`` really runs (torch's FlopCounterMode): checks the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(dtype, device, repeats: int = 5, quick: bool = False) -> dict:
    """Best median GFLOP/s of square matrix multiplies (sizes 1024..4096 on CPU)."""
    sizes = (256, 512) if quick else (1024, 2048, 4096) if device == "cpu" else (4096, 8192)
    best = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = median(race({"mm": lambda: a @ b}, repeats, device)["mm"])
        best[n] = 2 * n ** 3 / t / 1e9
    return {"gflops": max(best.values()), "by_size": best}

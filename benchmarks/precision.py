"""Low precision against float32: how far bf16 head importances and losses are from the fp32 ones,
for headlens and for a plain ``transformers`` loop on the same weights and tokens.

    python benchmarks/precision.py                 # writes benchmarks/results/precision.json

SmolLM2-135M (the bundled weights), 4 sequences of 40 tokens of real prose (Python's docs, its
own tokenizer), the zero ablation of every head of layers 0 and 1 (18 heads), importance = mean
next-token loss change. The reference is headlens' fp32 naive sweep; in fp32 it equals the
``transformers`` fp32 loop (checked here, within 1e-4). In bf16 the contenders are:

- ``headlens fast`` / ``headlens naive``: headlens' exact fast sweep and its one-forward-per-head
  sweep on the model loaded with ``dtype=bfloat16`` (bf16 matmuls; norms, rotary, softmax and the
  loss in fp32; the residual stream kept in fp32 by default, see ``ModelConfig.residual_dtype``);
- ``transformers``: ``LlamaForCausalLM`` of the same weights in bf16 (sdpa), one forward per head
  with that head's slice of ``o_proj``'s input zeroed: the loop a transformers user writes.

Reported: per contender the largest and mean |bf16 - fp32| importance over the 18 heads, and the
clean forward's loss error. The bar (the scale issue): headlens' bf16 sweep error at most half of
the transformers loop's, and its loss error no larger.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, N, P = (0, 1), 4, 40


def prose(tok) -> torch.Tensor:
    """``[N, P]`` ids: BOS, then consecutive chunks of Python's docs."""
    from pydoc_data.topics import topics

    ids = []
    for key in sorted(topics):
        ids += tok(topics[key], add_special_tokens=False)["input_ids"]
        if len(ids) >= N * (P - 1):
            break
    body = torch.tensor(ids[: N * (P - 1)]).view(N, P - 1)
    return torch.cat([torch.full((N, 1), tok.bos_token_id), body], dim=1)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss per sequence ``[N]`` (float64; logits upcast first)."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(ids.shape[0], -1).mean(1).double()


def headlens_sweep(model, ids: torch.Tensor, method: str) -> torch.Tensor:
    from headlens.importance.sweep import ablation_sweep
    from headlens.importance.tasks import LMLossTask

    task = LMLossTask([row.tolist() for row in ids], name="prose", max_tokens=P)
    heads = [(layer, h) for layer in LAYERS for h in range(model.cfg.n_heads)]
    table = ablation_sweep(model, task, "zero", heads=heads, method=method, n_bootstrap=0, batch_size=N,
                           progress=False)
    return torch.tensor(table["importance"].to_numpy())


def headlens_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(lm_loss(model(ids), ids).mean())


def transformers_loop(hf, ids: torch.Tensor, n_heads: int, d_head: int) -> tuple[torch.Tensor, float]:
    """One forward per head, the head's part of ``o_proj``'s input zeroed; and the clean loss."""
    out = []
    with torch.no_grad():
        clean = lm_loss(hf(ids).logits, ids).mean()
        for layer in LAYERS:
            o_proj = hf.model.layers[layer].self_attn.o_proj
            for h in range(n_heads):
                def zero(module, args, h=h):
                    x = args[0].clone()
                    x[..., h * d_head:(h + 1) * d_head] = 0
                    return (x,)

                handle = o_proj.register_forward_pre_hook(zero)
                try:
                    out.append(float(lm_loss(hf(ids).logits, ids).mean() - clean))
                finally:
                    handle.remove()
    return torch.tensor(out, dtype=torch.float64), float(clean)


def errors(x: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (x - ref).abs()
    return dict(max_abs_error=float(d.max()), mean_abs_error=float(d.mean()),
                relative_max_error=float(d.max() / ref.abs().max()))


def main() -> None:
    from transformers import AutoModelForCausalLM

    import headlens
    from headlens.io.to_hf import save_hf

    torch.manual_seed(0)
    started = time.perf_counter()
    fp32 = headlens.load("smollm2")
    ids = prose(fp32.tokenizer)
    cfg = fp32.cfg
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(fp32, Path(tmp) / "hf")
        hf32 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        hf16 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).eval()
    ref = headlens_sweep(fp32, ids, "naive")
    ref_loss = headlens_loss(fp32, ids)
    hf_ref, hf_ref_loss = transformers_loop(hf32, ids, cfg.n_heads, cfg.d_head)
    del fp32, hf32
    bf16 = headlens.load("smollm2", dtype=torch.bfloat16)
    res = {
        "fast": headlens_sweep(bf16, ids, "fast"),
        "naive": headlens_sweep(bf16, ids, "naive"),
    }
    loss16 = headlens_loss(bf16, ids)
    hf_imp, hf_loss = transformers_loop(hf16, ids, cfg.n_heads, cfg.d_head)
    rows = {f"headlens {k}": errors(v, ref) for k, v in res.items()}
    rows["transformers"] = errors(hf_imp, ref)
    for k in res:
        rows[f"headlens {k}"]["loss_error"] = abs(loss16 - ref_loss)
    rows["transformers"]["loss_error"] = abs(hf_loss - ref_loss)
    hl_worst = max(rows["headlens fast"]["max_abs_error"], rows["headlens naive"]["max_abs_error"])
    out = {
        "what": __doc__.strip().splitlines()[0],
        "command": "python benchmarks/precision.py",
        "setting": dict(model="smollm2", layers=list(LAYERS), sequences=N, positions=P, ablation="zero",
                        residual_dtype=str(bf16.cfg.residual_dtype) if hasattr(bf16.cfg, "residual_dtype") else None),
        "machine": dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                        threads=torch.get_num_threads()),
        "fp32": dict(max_abs_importance=float(ref.abs().max()), loss=ref_loss,
                     transformers_max_abs_gap=float((hf_ref - ref).abs().max()),
                     transformers_loss_gap=abs(hf_ref_loss - ref_loss)),
        "bf16": rows,
        "targets": {
            "fp32 headlens equals transformers (1e-4)": float((hf_ref - ref).abs().max()) <= 1e-4,
            "bf16 sweep error <= half of transformers'": hl_worst <= 0.5 * rows["transformers"]["max_abs_error"],
            "bf16 loss error <= transformers'": rows["headlens fast"]["loss_error"] <= rows["transformers"]["loss_error"],
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("fp32", "bf16", "targets")}, indent=2))


if __name__ == "__main__":
    main()

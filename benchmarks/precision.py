"""Low precision against float32: how far bf16 head importances and losses are from the fp32 ones,
for headlens and for a plain ``transformers`` loop on the same weights and tokens.

    python benchmarks/precision.py                 # writes benchmarks/results/precision.json

SmolLM2-135M (the bundled weights), 4 sequences of 40 tokens of real prose (Python's docs, its
own tokenizer), the zero ablation of every head of layers 0 and 1 (18 heads), importance = mean
next-token loss change; on ``SAMPLES`` disjoint such sets of prose, since on 160 tokens one set's
errors are mostly the luck of its rounding. The reference is headlens' fp32 naive sweep; in fp32 it equals the
``transformers`` fp32 loop (checked here, within 1e-4). In bf16 the contenders are:

- ``headlens fast`` / ``headlens naive``: headlens' exact fast sweep and its one-forward-per-head
  sweep on the model loaded with ``dtype=bfloat16`` (bf16 matmuls and residual stream; norms and
  softmax in fp32 as transformers computes them; the loss from the logits upcast to fp32);
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
from bench import lm_loss_per_example as lm_loss

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, N, P, SAMPLES = (0, 1), 4, 40, 3


def prose(tok, sample: int = 0) -> torch.Tensor:
    """``[N, P]`` ids: BOS, then consecutive chunks of Python's docs (set ``sample`` of them)."""
    from pydoc_data.topics import topics

    ids, need = [], (sample + 1) * N * (P - 1)
    for key in sorted(topics):
        ids += tok(topics[key], add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    body = torch.tensor(ids[need - N * (P - 1): need]).view(N, P - 1)
    return torch.cat([torch.full((N, 1), tok.bos_token_id), body], dim=1)


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


def one_sample(fp32, bf16, hf32, hf16, sample: int) -> dict:
    """Errors of each bf16 contender against headlens' fp32 naive sweep on one set of prose."""
    cfg = fp32.cfg
    ids = prose(fp32.tokenizer, sample)
    ref, ref_loss = headlens_sweep(fp32, ids, "naive"), headlens_loss(fp32, ids)
    hf_ref, hf_ref_loss = transformers_loop(hf32, ids, cfg.n_heads, cfg.d_head)
    loss16 = headlens_loss(bf16, ids)
    rows = {f"headlens {k}": dict(errors(headlens_sweep(bf16, ids, k), ref), loss_error=abs(loss16 - ref_loss))
            for k in ("fast", "naive")}
    hf_imp, hf_loss = transformers_loop(hf16, ids, cfg.n_heads, cfg.d_head)
    rows["transformers"] = dict(errors(hf_imp, ref), loss_error=abs(hf_loss - ref_loss))
    return dict(max_abs_importance=float(ref.abs().max()), transformers_fp32_gap=float((hf_ref - ref).abs().max()),
                transformers_fp32_loss_gap=abs(hf_ref_loss - ref_loss), bf16=rows)


def main() -> None:
    from transformers import AutoModelForCausalLM

    import headlens
    from headlens.io.to_hf import save_hf

    torch.manual_seed(0)
    started = time.perf_counter()
    fp32 = headlens.load("smollm2")
    bf16 = headlens.load("smollm2", dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(fp32, Path(tmp) / "hf")
        hf32 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        hf16 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).eval()
    samples = [one_sample(fp32, bf16, hf32, hf16, s) for s in range(SAMPLES)]
    names = list(samples[0]["bf16"])
    mean = {name: {k: sum(s["bf16"][name][k] for s in samples) / SAMPLES for k in samples[0]["bf16"][name]}
            for name in names}
    hl_worst = max(mean["headlens fast"]["max_abs_error"], mean["headlens naive"]["max_abs_error"])
    hf = mean["transformers"]
    out = {
        "what": __doc__.strip().splitlines()[0],
        "command": "python benchmarks/precision.py",
        "setting": dict(model="smollm2", layers=list(LAYERS), sequences=N, positions=P, samples=SAMPLES,
                        ablation="zero"),
        "machine": dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                        threads=torch.get_num_threads()),
        "mean_over_samples": mean,
        "samples": samples,
        "targets": {
            "fp32 headlens equals transformers (1e-4)": max(s["transformers_fp32_gap"] for s in samples) <= 1e-4,
            "bf16 sweep error <= half of transformers'": hl_worst <= 0.5 * hf["max_abs_error"],
            "bf16 loss error <= transformers'": mean["headlens fast"]["loss_error"] <= hf["loss_error"],
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("mean_over_samples", "targets", "seconds")}, indent=2))


if __name__ == "__main__":
    main()

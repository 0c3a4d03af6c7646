"""Training the toy models from scratch: deterministic under a seed, and returning the model card."""
from __future__ import annotations

import math
import time
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.model.transformer import HeadlensModel
from headlens.synthetic.cards import model_card
from headlens.synthetic.toys import ToySpec, task_loss, toy_config, toy_spec, train_batch


def train_toy(toy: Union[str, ToySpec], seed: int = 0, steps: Optional[int] = None, threads: int = 1,
              progress: bool = False) -> tuple[HeadlensModel, dict]:
    """Train toy model ``toy`` (a name in :data:`TOYS` or a :class:`ToySpec`) from scratch.

    AdamW with linear warm-up and cosine decay over ``steps`` (default: the spec's). Deterministic
    under ``seed`` and ``threads`` (one thread is also the fastest on a busy CPU). Returns the
    model (eval mode) and its model card (see :func:`model_card`).
    """
    spec = toy if isinstance(toy, ToySpec) else toy_spec(toy)
    steps = spec.steps if steps is None else steps
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    check(isinstance(threads, int) and threads >= 1, f"threads must be an integer >= 1, got {threads!r}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = HeadlensModel(toy_config(spec)).init_weights(seed=seed).train()
        model.set_attn_implementation("eager")  # the path the shipped toys were trained on: bit for bit
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98),
                                weight_decay=spec.weight_decay)
        warmup = min(spec.warmup, max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        data_gen = torch.Generator().manual_seed(seed + 1_000_003)
        losses = []
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in tqdm(range(steps), desc=spec.name, disable=not progress):
            loss = task_loss(model, spec.task, train_batch(spec, data_gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        timing = {"train_seconds": time.perf_counter() - wall, "train_cpu_seconds": time.process_time() - cpu}
        model.eval()
        model.set_attn_implementation("sdpa")
        card = model_card(model, spec, seed=seed, steps=steps, threads=threads,
                          final_loss=sum(losses[-50:]) / len(losses[-50:]), **timing)
    finally:
        torch.set_num_threads(old_threads)
    return model, card



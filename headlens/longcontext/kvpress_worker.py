"""Apply KV plans and kvpress' own presses to a transformers model, as a kvpress user would.

Runs in kvpress' own virtualenv (``.venv-kvpress``, made by ``scripts/setup.sh --test``: kvpress
0.5.x pins ``transformers<5.3``), not in headlens' environment, and imports no headlens: it reads
only files headlens wrote::

    .venv-kvpress/bin/python kvpress_worker.py --model HF_FOLDER --prompts prompts.jsonl \\
        --config plan=duo:kv_plan.json --config knorm50=knorm:0.5 --out results.jsonl [--check]

- ``HF_FOLDER``: the model exported by ``headlens.io.to_hf.save_hf`` (SmolLM2 as ``LlamaForCausalLM``);
- ``prompts.jsonl``: per example ``id``, ``tokens`` (ids), ``context_len``, ``answer_start``;
- a config ``NAME=duo:PLAN`` is a ``DuoAttentionPress`` whose ``load_attention_pattern`` returns the
  plan's ``(sink_size, recent_size, scores [L, K])`` (0: the kv head streams), with
  ``head_compression_ratio`` = its share of streaming kv heads; ``NAME=knorm:R``,
  ``snapkv:R``, ``streaming_llm:R`` are kvpress' scorer presses at compression ratio R; ``full``
  is no press.

Per example the context is prefilled once with every press attached: after each attention layer
each press's own ``compress`` receives that layer's keys, values and inputs, exactly what its
forward hook gives it in a run of its own (the prefill itself does not depend on the press, the
cache only matters after it); then the question and answer run from each press's cache. With
``--check`` the first config is also run the ordinary way (``with press(model): model(context)``)
and both caches and answer logits must agree. Each result line: ``config``, ``id``, ``loss``
(mean answer-token cross-entropy), ``correct`` (greedy decoding reproduces the answer),
``kept`` / ``total`` cached key positions (summed over layers and kv heads), the press's
``compression_ratio``, and the answer logits' top tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def duo_press(plan_path: str):
    from kvpress import DuoAttentionPress

    plan = json.loads(open(plan_path, encoding="utf-8").read())
    assert plan.get("schema") == "headlens.kv_plan" and plan.get("version") == 1, f"{plan_path}: not a kv plan v1"
    L, K = plan["model"]["n_layers"], plan["model"]["n_kv_heads"]
    scores = np.ones((L, K))
    for layer, kvs in plan["streaming"].items():
        scores[int(layer), kvs] = 0.0
    n_stream = int((scores == 0).sum())

    class PlanPress(DuoAttentionPress):
        @staticmethod
        def load_attention_pattern(model):
            return plan["sink_size"], plan["recent_size"], scores

    # argsort puts the zeros (streaming) first: exactly the plan's heads stream
    return PlanPress(head_compression_ratio=n_stream / scores.size)


def make_press(spec: str):
    kind, _, arg = spec.partition(":")
    if kind == "full":
        return None
    if kind == "duo":
        return duo_press(arg)
    from kvpress import KnormPress, SnapKVPress, StreamingLLMPress

    presses = {"knorm": KnormPress, "snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress}
    assert kind in presses, f"unknown press {kind!r}: full, duo:PLAN, " + ", ".join(presses)
    return presses[kind](compression_ratio=float(arg))


def prefill_all(model, ids, presses: dict) -> tuple[dict, torch.Tensor]:
    """Prefill ``ids [1, C]`` once: per press name, its compressed ``(keys, values)`` per layer and
    (DuoAttention) the key indices it masks; and the context's last logits ``[1, V]`` (the same
    for every press: a press acts after the attention it compresses)."""
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    for p in presses.values():
        if p is not None:
            p.post_init_from_model(model)
    out = {name: {"kv": [], "masked": []} for name in presses}
    layers = model.model.layers

    def hook(module, args, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for name, p in presses.items():
            module.masked_key_indices = None
            k, v = (keys, values) if p is None else p.compress(module, kwargs["hidden_states"], keys, values,
                                                                output[1], kwargs)
            out[name]["kv"].append((k.clone(), v.clone()))
            out[name]["masked"].append(getattr(module, "masked_key_indices", None))
            if p is not None:
                out[name]["ratio"] = getattr(p, "compression_ratio_", None) or getattr(p, "compression_ratio", 0.0)
        module.masked_key_indices = None
        return output

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            last = model(ids, past_key_values=DynamicCache(), use_cache=True).logits[0, -1:]
    finally:
        for h in handles:
            h.remove()
    return out, last


def tail_positions(C: int, tail: torch.Tensor) -> torch.Tensor:
    """``[1, T]`` position ids of the tokens after a context of ``C`` tokens: a press that drops
    keys shortens the cache, so the positions are given, as kvpress' own pipeline gives them."""
    return torch.arange(C, C + tail.shape[1])[None]


def decode(model, state: dict, tail: torch.Tensor, C: int):
    """Logits of ``tail [1, T]`` (positions ``C ..``) run from a press's cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(state["kv"]):
        cache.update(k, v, i)
    for layer, masked in zip(model.model.layers, state["masked"]):
        layer.self_attn.masked_key_indices = masked
    try:
        with torch.no_grad():
            return model(tail, past_key_values=cache, position_ids=tail_positions(C, tail), use_cache=True).logits[0]
    finally:
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None


def kept_positions(state: dict, C: int) -> tuple[int, int]:
    """Cached key positions kept (not compressed away nor masked) and those of the full cache of
    the ``C`` context positions, over layers and kv heads."""
    kept = total = 0
    for (k, _), masked in zip(state["kv"], state["masked"]):
        B, K, S, _ = k.shape
        n_masked = 0 if masked is None else int(masked[0].numel())
        kept += B * K * S - n_masked
        total += B * K * C
    return kept, total


def score(logits: torch.Tensor, tokens: list, answer_start: int, offset: int) -> dict:
    """Answer loss and exact greedy match from the logits of positions ``offset ..`` (the context's
    last one, then the tail's: an LM example's answer starts right after its context)."""
    rows = torch.arange(answer_start - 1, len(tokens) - 1) - offset
    target = torch.tensor(tokens[answer_start:])
    lg = logits[rows].float()
    loss = torch.nn.functional.cross_entropy(lg, target).item()
    return dict(loss=loss, correct=bool((lg.argmax(-1) == target).all()), top=lg.argmax(-1).tolist())


def unmasked(k: torch.Tensor, masked) -> torch.Tensor:
    """``k [B, K, S, d]`` with the positions a press masks (``(batch, head, position)`` indices) zeroed."""
    k = k.clone()
    if masked is not None:
        k[masked] = 0
    return k


def ordinary_run(model, press, ids, tail):
    """The first config the way kvpress documents it, for --check."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(ids, past_key_values=cache, use_cache=True)
        logits = model(tail, past_key_values=cache, position_ids=tail_positions(ids.shape[1], tail),
                       use_cache=True).logits[0]
    return cache, logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--config", action="append", required=True, help="NAME=full | duo:PLAN | knorm:R | ...")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import kvpress  # noqa: F401  (patches transformers' attention functions for head-wise masking)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32).eval()
    configs = dict(c.split("=", 1) for c in args.config)
    prompts = [json.loads(x) for x in open(args.prompts, encoding="utf-8") if x.strip()]
    results = []
    for ex in prompts:
        tokens, C = ex["tokens"], ex["context_len"]
        ids, tail = torch.tensor([tokens[:C]]), torch.tensor([tokens[C:]])
        presses = {name: make_press(spec) for name, spec in configs.items()}
        states, last = prefill_all(model, ids, presses)
        for name in configs:
            logits = torch.cat([last, decode(model, states[name], tail, C)])
            kept, total = kept_positions(states[name], C)
            results.append(dict(config=name, id=ex["id"], kept=kept, total=total,
                                compression_ratio=float(states[name].get("ratio", 0.0) or 0.0),
                                **score(logits, tokens, ex["answer_start"], C - 1)))
        if args.check:
            name = next(iter(configs))
            cache, logits = ordinary_run(model, make_press(configs[name]), ids, tail)
            # DuoAttention's decoding overwrites the masked keys of the cache in place (fake keys): compare the rest
            same_cache = all(torch.equal(unmasked(cache.layers[i].keys[:, :, :k.shape[2]], m), unmasked(k, m))
                             for i, ((k, _), m) in enumerate(zip(states[name]["kv"], states[name]["masked"])))
            diff = float((logits - decode(model, states[name], tail, C)).abs().max())
            results.append(dict(config=name, id=ex["id"], check=True, same_cache=same_cache, max_logit_diff=diff))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in results))
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else ''}, transformers "
          f"{transformers.__version__}: {len(prompts)} prompts x {len(configs)} configs in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

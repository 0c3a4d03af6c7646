"""Small attention-only decoders whose heads' roles are known: their training data, the training
loop, and the measurements written into their model cards.

Kinds (Elhage et al. 2021; Olsson et al. 2022):

- ``induction-2l``: 2 layers x 4 heads, trained on random tokens repeated with a random period.
  Layer 0 forms a previous-token head and layer 1 induction heads (K-composition), so the loss on
  the repeated half of ``[BOS, x, x]`` falls far below the loss on the first half.
- ``induction-1l``: the same data and recipe with one layer, which cannot form induction heads.
- ``first-token``: 1 layer x 2 heads with two read-outs: logits ``[:V/2]`` must name the
  sequence's first token and logits ``[V/2:]`` the previous token, so one head has to attend to
  position 0 and the other to position ``i-1``.

Shapes: ``N`` sequences, ``P`` positions, ``T`` half length, ``V`` vocabulary, ``L`` layers,
``H`` heads.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headlens.errors import HeadlensError, check
from headlens.model.config import ModelConfig
from headlens.model.tokens import repeated_random_tokens
from headlens.model.transformer import HeadlensModel

BOS = 0  # token id of BOS in the induction models; their data tokens are 1 .. V-1
EVAL_SEED = 12345


@dataclass(frozen=True)
class ToySpec:
    """One toy model: its task, architecture and training recipe."""

    name: str
    task: str  # "induction" or "first-token"
    n_layers: int
    n_heads: int
    description: str
    d_model: int = 64
    d_head: int = 16
    n_ctx: int = 64
    vocab_size: int = 64
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100

    @property
    def n_input_tokens(self) -> int:
        """Token ids the data uses: all of the vocabulary, or its first half (first-token)."""
        return self.vocab_size // 2 if self.task == "first-token" else self.vocab_size


TOYS = {
    "induction-2l": ToySpec(
        "toy-induction-2l", "induction", n_layers=2, n_heads=4,
        description="2-layer attention-only decoder trained on random tokens repeated with a random "
                    "period ([BOS, x, x, ...], |x| uniform in 4..31): a previous-token head in "
                    "layer 0 and redundant induction heads in layer 1."),
    "induction-1l": ToySpec(
        "toy-induction-1l", "induction", n_layers=1, n_heads=4,
        description="1-layer control of toy-induction-2l (same data and recipe): one layer cannot "
                    "compose a previous-token head with an induction head."),
    "first-token": ToySpec(
        "toy-first-token", "first-token", n_layers=1, n_heads=2, vocab_size=128,
        description="1-layer attention-only model with two read-outs on uniform random tokens "
                    "0..63 (no BOS): logits 0..63 name the first token, logits 64..127 the previous "
                    "token; one head attends to the first token, the other to the previous one."),
}


def toy_spec(name: str) -> ToySpec:
    """The :class:`ToySpec` of the toy ``name``: ``induction-2l``, ``induction-1l`` or ``first-token``
    (with or without the ``toy-`` prefix)."""
    key = name[4:] if isinstance(name, str) and name.startswith("toy-") else name
    if key not in TOYS:
        raise HeadlensError(f"toy must be one of {sorted(TOYS)}, got {name!r}")
    return TOYS[key]


def toy_config(spec: ToySpec) -> ModelConfig:
    """Attention-only, pre-LayerNorm, learned positions; BOS = 0 for the induction models."""
    return ModelConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, n_heads=spec.n_heads, d_head=spec.d_head,
        n_ctx=spec.n_ctx, vocab_size=spec.vocab_size, mlp="none", norm="layernorm",
        positional="learned", family="toy", name=spec.name,
        bos_token_id=BOS if spec.task == "induction" else None,
        source="headlens.synthetic.toys", notes=spec.description)


# --- data -------------------------------------------------------------------------------------
def repeated_segment_tokens(n_seqs: int, n_ctx: int, vocab_size: int, generator: torch.Generator,
                            min_half: int = 4, bos_token_id: int = BOS) -> torch.Tensor:
    """Training data of the induction models: ``[BOS, x, x, x, ...]`` cut to ``n_ctx``, ``[N, n_ctx]``.

    ``x`` holds uniform tokens from ``1 .. V-1``; its length is uniform in
    ``min_half .. (n_ctx - 1) // 2`` per sequence (at least two copies), so the copy distance
    varies and a single layer cannot predict the repeats from positions alone.
    """
    max_half = (n_ctx - 1) // 2
    check(2 <= min_half <= max_half, f"min_half must lie in [2, {max_half}], got {min_half}")
    tokens = torch.randint(1, vocab_size, (n_seqs, n_ctx), generator=generator)
    tokens[:, 0] = bos_token_id
    half = torch.randint(min_half, max_half + 1, (n_seqs, 1), generator=generator)
    pos = torch.arange(n_ctx)[None]
    return tokens.gather(1, torch.where(pos > 0, 1 + (pos - 1) % half, pos))


def train_batch(spec: ToySpec, generator: torch.Generator) -> torch.Tensor:
    """One training batch ``[batch_size, n_ctx]`` of ``spec``'s task."""
    if spec.task == "induction":
        return repeated_segment_tokens(spec.batch_size, spec.n_ctx, spec.vocab_size, generator)
    return torch.randint(0, spec.n_input_tokens, (spec.batch_size, spec.n_ctx), generator=generator)


def readout_losses(logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """First-token model: per-example losses ``[N, P-1]`` and accuracies of its two read-outs at
    positions ``1 .. P-1`` (``first_token``: logits ``[:V/2]`` vs ``tokens[:, 0]``;
    ``previous_token``: logits ``[V/2:]`` vs ``tokens[:, i-1]``)."""
    half = logits.shape[-1] // 2
    targets = {"first_token": tokens[:, :1].expand(-1, tokens.shape[1] - 1),
               "previous_token": tokens[:, :-1]}
    out = {}
    for name, target in targets.items():
        part = logits[:, 1:, :half] if name == "first_token" else logits[:, 1:, half:]
        out[name] = F.cross_entropy(part.transpose(1, 2), target, reduction="none")
        out[name + "_accuracy"] = (part.argmax(-1) == target).float()
    return out


def task_loss(model: HeadlensModel, task: str, tokens: torch.Tensor) -> torch.Tensor:
    """Mean training loss on ``tokens [N, P]``: next-token loss (``induction``), or the mean of
    the two read-out losses (``first-token``)."""
    logits = model(tokens)
    if task == "induction":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    losses = readout_losses(logits, tokens)
    return (losses["first_token"].mean() + losses["previous_token"].mean()) / 2


# --- training ---------------------------------------------------------------------------------
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
        card = model_card(model, spec, seed=seed, steps=steps, threads=threads,
                          final_loss=sum(losses[-50:]) / len(losses[-50:]), **timing)
    finally:
        torch.set_num_threads(old_threads)
    return model, card


# --- measurements -----------------------------------------------------------------------------
def eval_tokens(model: HeadlensModel, half_len: Optional[int] = None, n_seqs: int = 200,
                seed: int = EVAL_SEED, n_tokens: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """``[BOS?, x, x]`` evaluation sequences ``[N, P]`` for ``model`` and their half length ``T``
    (default: the longest that fits the context). ``x`` is uniform over ``0 .. n_tokens-1``
    (default: the vocabulary) without BOS."""
    cfg = model.cfg
    prefix = 0 if cfg.bos_token_id is None else 1
    longest = (cfg.n_ctx - prefix) // 2
    half_len = longest if half_len is None else half_len
    check(2 <= half_len <= longest, f"half_len must lie in [2, {longest}] for a context of {cfg.n_ctx}, "
                                    f"got {half_len}")
    exclude = () if cfg.bos_token_id is None else (cfg.bos_token_id,)
    tokens = repeated_random_tokens(n_seqs, half_len, n_tokens or cfg.vocab_size, seed=seed,
                                    bos_token_id=cfg.bos_token_id, exclude=exclude)
    return tokens, half_len


@torch.no_grad()
def repeat_losses(model: HeadlensModel, tokens: torch.Tensor, half_len: int,
                  head_gate: Optional[torch.Tensor] = None) -> dict:
    """Next-token loss on ``[BOS?, x, x]`` ``tokens [N, P]``, split by half.

    ``loss_first_half``: predicting ``x[1:]`` in the first copy; ``loss_repeated_half``:
    predicting ``x[1:]`` in the second copy (``x[0]`` is unpredictable in both).
    """
    check(tokens.ndim == 2 and tokens.shape[1] >= 2 * half_len,
          f"tokens must be [N, P] holding two copies of length half_len={half_len}")
    prefix = tokens.shape[1] - 2 * half_len
    logits = model(tokens, head_gate=head_gate)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [N, P-1]
    first = nll[:, prefix: prefix + half_len - 1]  # targets x[1:] of the first copy
    second = nll[:, prefix + half_len: prefix + 2 * half_len - 1]
    return {"loss_first_half": first.mean().item(), "loss_repeated_half": second.mean().item()}


@torch.no_grad()
def readout_metrics(model: HeadlensModel, tokens: torch.Tensor, head_gate: Optional[torch.Tensor] = None) -> dict:
    """First-token model: mean loss and accuracy of both read-outs on ``tokens [N, P]``."""
    out = readout_losses(model(tokens, head_gate=head_gate), tokens)
    return {f"{'accuracy' if k.endswith('_accuracy') else 'loss'}_{k.replace('_accuracy', '')}": v.mean().item()
            for k, v in out.items()}


def task_metrics(model: HeadlensModel, task: str, tokens: torch.Tensor, half_len: int,
                 head_gate: Optional[torch.Tensor] = None) -> dict:
    """The losses a card reports: :func:`repeat_losses` or :func:`readout_metrics`."""
    if task == "induction":
        return repeat_losses(model, tokens, half_len, head_gate)
    return readout_metrics(model, tokens, head_gate)


@torch.no_grad()
def head_attention(model: HeadlensModel, tokens: torch.Tensor, half_len: int) -> pd.DataFrame:
    """Per-head attention measured from ``blocks.{l}.attn.hook_pattern`` on ``[BOS?, x, x]``.

    Columns: ``layer, head, previous_token`` (mean ``A[i, i-1]`` over ``i >= 1``),
    ``first_token`` (mean ``A[i, 0]`` over ``i >= 1``), ``self`` (mean ``A[i, i]``),
    ``induction`` (mean ``A[i, i-T+1]`` over the second copy), and each under uniform causal
    attention (``*_chance``).
    """
    check(tokens.ndim == 2 and tokens.shape[1] >= 2 * half_len,
          f"tokens must be [N, P] holding two copies of length half_len={half_len}")
    P = tokens.shape[1]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    i = torch.arange(P)
    second = i[P - half_len:]
    uniform = torch.tril(torch.ones(P, P)) / (i[:, None] + 1)
    rows = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float().mean(0)  # [H, P, S]
        for h, head in enumerate(model.blocks[layer].attn.head_ids):
            row = {"layer": layer, "head": head}
            for suffix, A in (("", pattern[h]), ("_chance", uniform)):
                row["previous_token" + suffix] = A[i[1:], i[1:] - 1].mean().item()
                row["first_token" + suffix] = A[i[1:], 0].mean().item()
                row["self" + suffix] = A[i, i].mean().item()
                row["induction" + suffix] = A[second, second - half_len + 1].mean().item()
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["layer", "head"], ignore_index=True)


def head_ablations(model: HeadlensModel, task: str, tokens: torch.Tensor, half_len: int) -> pd.DataFrame:
    """The card's losses with each head zeroed alone (``head_gate`` = 0): one row per head,
    ``layer, head`` then one ``ablated_<loss>`` column per loss of :func:`task_metrics`."""
    rows = []
    for layer, head in model.head_labels():
        gate = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
        gate[layer, model.blocks[layer].attn.head_ids.index(head)] = 0
        metrics = task_metrics(model, task, tokens, half_len, head_gate=gate)
        rows.append({"layer": layer, "head": head,
                     **{f"ablated_{k}": v for k, v in metrics.items() if k.startswith("loss")}})
    return pd.DataFrame(rows)


# Thresholds that turn the measured attention into the roles a card states.
ROLE_THRESHOLDS = {"previous_token": 0.5, "induction": 0.3, "first_token": 0.5}


def known_roles(heads: pd.DataFrame, thresholds: Optional[dict] = None) -> pd.Series:
    """One role per head: the score in ``thresholds`` it exceeds by the widest margin, else ``other``."""
    thresholds = dict(ROLE_THRESHOLDS, **(thresholds or {}))
    margin = pd.DataFrame({role: heads[role] - t for role, t in thresholds.items()})
    best = margin.idxmax(axis=1).str.replace("_", "-")
    return best.where(margin.max(axis=1) > 0, "other")


def measure(model: HeadlensModel, task: Optional[str] = None) -> tuple[pd.DataFrame, dict]:
    """Everything a card states about ``model``: per-head table (attention scores, chance levels,
    role, ablated losses) and the clean losses on the evaluation data."""
    task = task or ("induction" if model.cfg.bos_token_id is not None else "first-token")
    n_tokens = model.cfg.vocab_size // 2 if task == "first-token" else None
    tokens, half_len = eval_tokens(model, n_tokens=n_tokens)
    heads = head_attention(model, tokens, half_len)
    heads["role"] = known_roles(heads)
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
    heads, metrics = measure(model, spec.task)
    recipe = {k: v for k, v in asdict(spec).items() if k not in ("name", "task", "description", "steps")}
    return {
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
        "eval": dict(_rounded(metrics), seed=EVAL_SEED,
                     data="[BOS?, x, x] with x uniform random tokens (headlens.synthetic.toys.eval_tokens)"),
        "role_thresholds": ROLE_THRESHOLDS,
        "heads": [_rounded(row) for row in heads.to_dict("records")],
        "roles": {role: [[int(r.layer), int(r.head)] for r in heads.itertuples() if r.role == role]
                  for role in sorted(set(heads["role"])) if role != "other"},
    }


ROLE_TEXT = {"previous-token": "attends to the previous token", "induction": "induction head: attends "
             "to the token after the previous occurrence of the current token",
             "first-token": "attends to the first token", "other": "no single known role"}


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
        "Attention measured from `blocks.{l}.attn.hook_pattern` on the evaluation data "
        "(chance = uniform causal attention). `ablated ...` = the loss with that head's output zeroed.", "",
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
        lines.append("- none: no head passes the thresholds " + str(card["role_thresholds"]))
    return "\n".join(lines) + "\n"


def save_toy(model: HeadlensModel, card: dict, folder):
    """Write a trained toy model with its ``card.json`` and ``card.md`` (a headlens checkpoint)."""
    from headlens.io.native import save_model

    return save_model(model, folder, card=card, card_md=card_markdown(card))

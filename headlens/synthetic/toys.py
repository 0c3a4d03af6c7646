"""Small attention-only decoders whose heads' roles are known: their specs, training data, losses
and evaluation data. Training is :mod:`headlens.synthetic.training`; the model cards, measured
with the library's own pattern scores, roles and ablation, :mod:`headlens.synthetic.cards`.

Toys (Elhage et al. 2021; Olsson et al. 2022):

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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

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



"""Models with hand-set weights whose named heads do exactly one known thing: ground truth for
the pattern scores, roles and clusters.

The model is attention-only (no MLP, no norms, ``attn_scale = 1``). Its residual stream has
three one-hot subspaces (``V`` vocabulary, ``C`` context):

- ``[0, V)``: the current token (``W_E``);
- ``[V, V + C)``: the position (``W_pos``);
- ``[V + C, 2V + C)``: the previous token, written by every ``previous`` head (its values read
  the token subspace, its output writes here) and read by ``induction`` heads.

Every head has ``d_head = V + C`` features (token part, then position part). With ``s = scale``:

============== ======================================= =====================================
role           query at i                              key at j (q_i . k_j)
============== ======================================= =====================================
offset:k       s e_pos(i)                              e_pos(j - k): s when j = i + k
previous       offset:-1 (and writes the previous token)
next / self    offset:+1 / offset:0
first          s e_pos(0)                              e_pos(0) if j = 0: s when j = 0
duplicate      s (e_tok(x_i) - e_pos(i))               e_tok(x_j) + e_pos(j): s when x_j = x_i, j != i
induction      s e_tok(x_i)                            e_tok(x_{j-1}): s when x_{j-1} = x_i
uniform        0                                       0: uniform over the visible keys
============== ======================================= =====================================

Heads not named in ``roles`` are uniform. A query with no target key (e.g. the previous token of
position 0) spreads its attention uniformly. Only ``previous`` heads write to the residual stream,
and the heads given in ``writes``: head ``(l, h)`` with ``values [V]`` adds ``values[x_j]``,
weighted by its attention to key ``j``, to a residual coordinate of its own (``2V + C + n`` for the
``n``-th head of ``writes`` in sorted order), so a metric that reads those coordinates has a
known effect per head and example (``-values[x_j]`` when the head is zero-ablated).
"""
from __future__ import annotations

import torch

from headlens.errors import HeadlensError, check
from headlens.model.config import ModelConfig
from headlens.model.transformer import HeadlensModel

ALIASES = {
    "previous": ("offset", -1), "previous-token": ("offset", -1), "prev": ("offset", -1),
    "next": ("offset", 1), "next-token": ("offset", 1), "self": ("offset", 0),
    "first": ("first", 0), "first-token": ("first", 0), "first-token sink": ("first", 0), "bos": ("first", 0),
    "duplicate": ("duplicate", 0), "duplicate-token": ("duplicate", 0),
    "induction": ("induction", 0), "uniform": ("uniform", 0), "broad": ("uniform", 0),
}


def parse_role(role) -> tuple:
    """``"previous"`` / ``"offset:-2"`` / ``("offset", -2)`` ... -> ``(kind, offset)``."""
    if isinstance(role, tuple) and len(role) == 2 and role[0] == "offset" and isinstance(role[1], int):
        return role
    if isinstance(role, str) and role in ALIASES:
        return ALIASES[role]
    if isinstance(role, str) and role.startswith("offset:"):
        try:
            return ("offset", int(role.split(":", 1)[1]))
        except ValueError:
            pass
    raise HeadlensError(f"unknown planted role {role!r}; use one of {sorted(ALIASES)} or 'offset:k'")


def planted_model(roles: dict, n_layers: int = 2, n_heads: int = 4, d_model=None, vocab_size: int = 32,
                  n_ctx: int = 32, scale: float = 40.0, causal: bool = True, writes=None) -> HeadlensModel:
    """A :class:`HeadlensModel` whose heads ``{(layer, head): role}`` do exactly their role.

    Roles: ``previous``, ``next``, ``self``, ``offset:k`` (attend to key ``i + k``), ``first``,
    ``duplicate``, ``induction`` (needs a ``previous`` head in an earlier layer), ``uniform``.
    ``scale`` is the logit of a target key over the others: ``exp(-scale)`` leaks elsewhere.
    ``d_model`` defaults to (and must be at least) ``2 * vocab_size + n_ctx`` (+ one coordinate per
    head of ``writes``, ``{(layer, head): values [vocab_size]}``, see the module doc).
    """
    check(isinstance(roles, dict), f"roles must be a dict {{(layer, head): role}}, got {type(roles).__name__}")
    check(n_layers >= 1 and n_heads >= 1, f"need n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}")
    check(vocab_size >= 2 and n_ctx >= 2, f"need vocab_size >= 2 and n_ctx >= 2, got {vocab_size}, {n_ctx}")
    V, C = vocab_size, n_ctx
    writes = {} if writes is None else dict(writes)
    for key, values in writes.items():
        check(isinstance(key, tuple) and len(key) == 2 and 0 <= key[0] < n_layers and 0 <= key[1] < n_heads,
              f"writes keys must be (layer, head) tuples inside {n_layers} layers x {n_heads} heads, got {key!r}")
        check(len(values) == vocab_size, f"writes[{key}] must hold {vocab_size} values (one per token), "
                                         f"got {len(values)}")
    needed = 2 * V + C + len(writes)
    d_model = needed if d_model is None else d_model
    check(d_model >= needed, f"d_model must be >= 2 * vocab_size + n_ctx = {needed}, got {d_model}")
    parsed = {}
    for key, role in roles.items():
        check(isinstance(key, tuple) and len(key) == 2, f"roles keys must be (layer, head) tuples, got {key!r}")
        layer, head = key
        check(0 <= layer < n_layers and 0 <= head < n_heads,
              f"roles key {key} is outside {n_layers} layers x {n_heads} heads")
        parsed[key] = parse_role(role)
    for (layer, head), (kind, _) in parsed.items():
        if kind == "induction":
            check(any(k == ("offset", -1) and lo < layer for (lo, _), k in parsed.items()),
                  f"the induction head {layer}.{head} needs a 'previous' head in an earlier layer")
    d = V + C
    cfg = ModelConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d, n_ctx=C, vocab_size=V,
        mlp="none", norm="none", final_norm=False, positional="learned", attn_scale=1.0,
        qkv_bias=False, out_bias=False, causal=causal, unembed="lm", family="planted", name="planted",
        notes="hand-set heads: " + ", ".join(f"{lay}.{h}={r}" for (lay, h), r in sorted(roles.items())),
    )
    model = HeadlensModel(cfg)
    pos, tok = torch.arange(C), torch.arange(V)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[tok, tok] = 1.0
        model.W_pos[pos, V + pos] = 1.0
        model.unembed.W_U[tok, tok] = 1.0
        for (layer, head), (kind, k) in parsed.items():
            attn = model.blocks[layer].attn
            Q, K = attn.W_Q[:, head], attn.W_K[:, head]  # [D, d] views
            if kind == "offset":
                targets = pos - k  # key j carries e_pos(j - k)
                ok = (targets >= 0) & (targets < C)
                Q[V + pos, V + pos] = scale
                K[V + pos[ok], V + targets[ok]] = 1.0
                if k == -1:  # previous-token heads copy the token into the previous-token subspace
                    attn.W_V[tok, head, tok] = 1.0
                    attn.W_O[head, tok, V + C + tok] = 1.0
            elif kind == "first":
                Q[V + pos, V] = scale
                K[V, V] = 1.0
            elif kind == "duplicate":
                Q[tok, tok] = scale
                Q[V + pos, V + pos] = -scale
                K[tok, tok] = 1.0
                K[V + pos, V + pos] = 1.0
            elif kind == "induction":
                Q[tok, tok] = scale
                K[V + C + tok, tok] = 1.0
        for n, ((layer, head), values) in enumerate(sorted(writes.items())):
            attn = model.blocks[layer].attn
            attn.W_V[tok, head, tok] = 1.0
            attn.W_O[head, tok, 2 * V + C + n] = torch.as_tensor(values, dtype=attn.W_O.dtype)
    return model.eval()

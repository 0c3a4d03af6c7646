"""Long-context heads and KV-cache decisions: which heads can stream, which must retrieve.

Owns: :mod:`~headlens.longcontext.tasks` (passkey / needle / multi-key retrieval and long-document
LM loss over real prose, built to exact lengths from ``headlens/data/longcontext``),
:mod:`~headlens.longcontext.scores` (sink rate, Gu et al. 2024; retrieval score, Wu et al. 2024),
:mod:`~headlens.longcontext.decode` (a prefilled context's KV cache and the continuations run
from it, with heads streaming or ablated), :mod:`~headlens.longcontext.plans` (the KV plan:
streaming kv heads chosen on one split, scored on another against random and pattern-score
plans; ``kv_plan.json``; memory saved), :mod:`~headlens.longcontext.analysis` (the whole
``headlens kv-heads`` analysis) and :mod:`~headlens.longcontext.handoff` (the hand-off to kvpress,
run in its own virtualenv by ``kvpress_worker.py``, which imports no headlens).
May import: :mod:`headlens.importance` (the streaming ablation and its sweep), :mod:`headlens.io`
(exporting the model), :mod:`headlens.model`, :mod:`headlens.data`, :mod:`headlens.errors`,
:mod:`headlens.files`. Not :mod:`headlens.patterns`, :mod:`headlens.pruning` or any later stage.
Public names: ``load_long_context``, ``LongContextTask``, ``kv_heads``, ``KVPlan``, ``read_kv_plan``,
``write_kv_plan``.
"""

"""Which heads can go, and removing them: pruning plans, pruning curves, physical pruning.

Owns: :mod:`~headlens.pruning.plans` (the one versioned ``prune_plan.json`` schema, read and
written atomically), :mod:`~headlens.pruning.curve` (Michel iterative, ablation-order and random
curves chosen on one split and scored on another), :mod:`~headlens.pruning.uncertainty` (their
bootstrap CIs, paired tests against random orders, intervals on how many heads can go) and :mod:`~headlens.pruning.physical` (a smaller
model with heads' weights removed, and what it saves).
May import: :mod:`headlens.importance`, :mod:`headlens.model`, :mod:`headlens.errors`, :mod:`headlens.files`.
Public names: ``pruning_curve``, ``prune_heads``, ``plan_record``, ``write_plan``, ``read_plan``,
``plan_heads``.
"""
from headlens.pruning.curve import pruning_curve
from headlens.pruning.physical import prune_heads
from headlens.pruning.plans import plan_heads, plan_record, read_plan, write_plan

__all__ = ["pruning_curve", "prune_heads", "plan_record", "write_plan", "read_plan", "plan_heads"]

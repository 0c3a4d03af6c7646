"""How much each head matters to a task: tasks, ablation sweeps, gradient estimates, resume state.

Owns: :mod:`~headlens.importance.tasks` (what "the model does well" means, one number per
example), :mod:`~headlens.importance.ablation` (zero / mean / resample / uniform ablation),
:mod:`~headlens.importance.sweep` (every head's importance with bootstrap CIs, fast and exact),
:mod:`~headlens.importance.statistics` (the per-head table: bootstrap CIs, paired tests, Benjamini-Hochberg
q-values and Holm-adjusted p-values), :mod:`~headlens.importance.controls` (task-sensitivity controls:
all heads ablated, all attention uniform; the power estimate),
:mod:`~headlens.importance.gradients` (Michel et al. importance, attribution patching) and
:mod:`~headlens.importance.resume` (finished units of a long sweep, for resume).
May import: :mod:`headlens.model`, :mod:`headlens.data`, :mod:`headlens.errors`, :mod:`headlens.files`.
Not :mod:`headlens.patterns`, :mod:`headlens.io` or any later stage.
Public names: ``load_task``, ``ablate``, ``ablation_sweep``, ``sweep_metrics``, ``importance_table``,
``gradient_importance``, ``attribution_patching``.
"""
from headlens.importance.ablation import ablate
from headlens.importance.gradients import attribution_patching, gradient_importance
from headlens.importance.sweep import ablation_sweep, importance_table, sweep_metrics
from headlens.importance.tasks import load_task

__all__ = ["load_task", "ablate", "ablation_sweep", "sweep_metrics", "importance_table",
           "gradient_importance", "attribution_patching"]

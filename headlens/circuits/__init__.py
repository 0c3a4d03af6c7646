"""Circuits between heads: what each head reads from, writes to and composes with.

Owns: :mod:`~headlens.circuits.runs` (clean / corrupted batches, caches, bootstrap intervals),
:mod:`~headlens.circuits.tasks` (counterfactual tasks: repeated tokens for induction),
:mod:`~headlens.circuits.dla` (direct logit attribution per head and key position, final norm frozen),
:mod:`~headlens.circuits.patching` (activation patching of z / q / k / v / pattern, per head and
position, GQA-aware), :mod:`~headlens.circuits.paths` (path patching sender -> receiver via q / k / v /
logits, batched), :mod:`~headlens.circuits.weights` (OV / QK factored circuits, composition scores
with their random baseline, copying scores), :mod:`~headlens.circuits.graph` (the residual-stream
graph and a forward pass with every edge patchable), :mod:`~headlens.circuits.edges` (EAP and EAP-IG
edge scores) and :mod:`~headlens.circuits.faithfulness` (circuit extraction, exact verification,
faithfulness curves).
May import: :mod:`headlens.importance`, :mod:`headlens.patterns`, :mod:`headlens.model`,
:mod:`headlens.data`, :mod:`headlens.errors`, :mod:`headlens.files`. Not :mod:`headlens.pruning`
or any later stage; :mod:`headlens.reporting` and :mod:`headlens.cli` use it.

Shapes: ``B`` batch (``R`` rows of a task batch), ``P`` query positions, ``S`` key positions, ``L``
layers, ``H`` query heads, ``K`` key/value heads, ``d`` d_head, ``D`` d_model, ``V`` vocabulary,
``N`` examples. Heads are ``(layer, original head index)``; key/value heads by their own index.

Public names: ``LogitAttribution``, ``activation_patching``, ``path_patching``,
``composition_scores``, ``copying_scores``, ``ov_circuit``, ``qk_circuit``, ``full_ov_circuit``,
``EdgeGraph``, ``EdgeAttribution``, ``faithfulness_curve``, ``extract_circuit``, ``Circuit``,
``induction_task``, ``circuit_task``.
"""
from headlens.circuits.dla import LogitAttribution
from headlens.circuits.edges import EdgeAttribution
from headlens.circuits.faithfulness import Circuit, extract_circuit, faithfulness_curve
from headlens.circuits.graph import EdgeGraph
from headlens.circuits.patching import activation_patching
from headlens.circuits.paths import path_patching
from headlens.circuits.tasks import circuit_task, induction_task
from headlens.circuits.weights import composition_scores, copying_scores, full_ov_circuit, ov_circuit, qk_circuit

__all__ = ["LogitAttribution", "activation_patching", "path_patching", "composition_scores", "copying_scores",
           "ov_circuit", "qk_circuit", "full_ov_circuit", "EdgeGraph", "EdgeAttribution", "faithfulness_curve",
           "extract_circuit", "Circuit", "induction_task", "circuit_task"]

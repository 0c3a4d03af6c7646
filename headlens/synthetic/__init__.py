"""Models whose heads' roles are known: ground truth for every analysis.

Owns: :mod:`~headlens.synthetic.planted` (hand-set heads that do exactly one thing),
:mod:`~headlens.synthetic.toys` (small attention-only decoders trained here: specs, data, losses),
:mod:`~headlens.synthetic.training` (training them) and :mod:`~headlens.synthetic.cards` (their
model cards, measured with the library's own scores, roles and ablation).
May import: :mod:`headlens.model`, :mod:`headlens.io`, :mod:`headlens.patterns`,
:mod:`headlens.importance` (the toys are measured with the library's own scores and ablations).
Only :mod:`headlens.cli` and the tests import it.
Public names: ``planted_model``, ``train_toy``.
"""
from headlens.synthetic.planted import planted_model
from headlens.synthetic.training import train_toy

__all__ = ["planted_model", "train_toy"]

"""What every head looks at: captured patterns, per-head scores, readable roles and clusters.

Owns: :mod:`~headlens.patterns.capture` (patterns in memory or as streamed statistics),
:mod:`~headlens.patterns.scores` (Clark et al., Voita et al., TransformerLens detector and
induction scores), :mod:`~headlens.patterns.roles` (roles and Kovaleva et al. classes) and
:mod:`~headlens.patterns.clusters` (Jensen-Shannon head clustering).
May import: :mod:`headlens.model`, :mod:`headlens.data`, :mod:`headlens.errors`. Not :mod:`headlens.io`
or any later stage.
Public names: ``capture_patterns``, ``stream_head_stats``, ``pattern_scores``, ``assign_roles``,
``HeadClusterer``.
"""
from headlens.patterns.capture import capture_patterns, stream_head_stats
from headlens.patterns.clusters import HeadClusterer
from headlens.patterns.roles import assign_roles
from headlens.patterns.scores import pattern_scores

__all__ = ["capture_patterns", "stream_head_stats", "pattern_scores", "assign_roles", "HeadClusterer"]

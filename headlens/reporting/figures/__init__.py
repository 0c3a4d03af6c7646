"""Figures (seaborn / matplotlib), each saved as PNG and SVG: head patterns and clusters
(:mod:`~headlens.reporting.figures.patterns`), importance and pruning
(:mod:`~headlens.reporting.figures.importance`)."""

"""Reading weights into a :class:`HeadlensModel` (minimal core; see headlens.load)."""

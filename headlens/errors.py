"""headlens' own error type: every problem with the user's input is raised as a HeadlensError
whose message names the argument and what was expected."""


class HeadlensError(ValueError):
    """Bad input or an impossible request, explained in the message."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`HeadlensError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HeadlensError(message)

"""Wording shared by kiln's commands."""


def plural(n: int, word: str) -> str:
    """'1 step', '20 steps'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"

"""Checks of the ops' scalar arguments shared by every op."""
from __future__ import annotations


def is_number(value) -> bool:
    """A Python int or float, but not a bool: True is an int to Python, and `scale=True` or
    `eps=False` is a mistake to report, not the number 1 or 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Checks of scalar arguments and settings shared by the ops, the models and the configurations."""
from __future__ import annotations


def is_number(value) -> bool:
    """A Python int or float, but not a bool: True is an int to Python, and `scale=True` or
    `eps=False` is a mistake to report, not the number 1 or 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """A Python int, but not a bool (`steps=True` is a mistake, not 1 step)."""
    return isinstance(value, int) and not isinstance(value, bool)

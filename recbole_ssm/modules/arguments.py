"""Argument checks shared by the blocks' constructors (the blocks are usable on their own)."""
from numbers import Integral


def is_integer(value, minimum):
    """Whether ``value`` is an integer (a bool is not) of at least ``minimum``."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum


def check_positive_integers(**arguments):
    """A ValueError naming the first of these keyword arguments that is not an integer >= 1."""
    for name, value in arguments.items():
        if not is_integer(value, 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

"""User-facing errors: one clear line that names the bad value and the valid choices."""
from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """Bad input from the user (config, data, model). Printed as one line, no traceback."""


def choices_error(what: str, value, choices: Iterable) -> UserError:
    """`unknown model 'foo'; valid choices: a, b, c`"""
    choices = sorted(str(c) for c in choices)
    return UserError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")

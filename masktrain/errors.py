"""One error type for bad user input, and the wrapper that turns it into one clear line.

Entry points call :func:`exit_on_user_error`; library code raises :class:`UserError`
with a message that names the bad value and says what to fix.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """Bad input that the user can fix: printed as one line, never as a traceback."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError in ``exc``'s cause/context chain, if any."""
    # Hydra and Lightning wrap exceptions raised inside instantiate/fit; walk the chain.
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn``; a UserError anywhere in the exception chain exits 2 with one line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - we re-raise anything that is not user error
            user = find_user_error(exc)
            if user is None:
                raise
            print(f"error: {user}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


def check_range(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    """Check ``lo <= value <= hi`` (``lo < value`` when lo_open) for a number or a (min, max) pair."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            bracket = "(" if lo_open else "["
            raise UserError(f"{name}={value!r} is outside {bracket}{lo}, {hi}]; choose values in that range")
    if len(values) == 2 and values[0] > values[1]:
        raise UserError(f"{name}={value!r}: the minimum is larger than the maximum")

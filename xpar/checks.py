"""Config checks shared by the typed configs: each raises a ValueError that names the field
(`section.field`), its value and what would be valid."""

from __future__ import annotations

import logging
import sys


class UserError(ValueError):
    """Bad input the user can fix (config, data, checkpoint, command line): the trainer reports
    it as one line, without a traceback."""


def report_error(message: str) -> int:
    """Write `xpar: error: MESSAGE` to stderr in one write (ranks may share the stream, and
    print() writes the newline separately, so two ranks' lines could run together); returns
    the exit code for bad input, 2."""
    sys.stderr.write(f"xpar: error: {message}\n")
    sys.stderr.flush()
    return 2


def report_warning(message: str, log: logging.Logger | None = None) -> None:
    """Something the user should not miss that does not stop the job: `xpar: warning:` on
    stderr, beside error lines, and the same in the run's log when there is one."""
    sys.stderr.write(f"xpar: warning: {message}\n")
    sys.stderr.flush()
    if log is not None:
        log.warning(message)


def short_list(items: list[str], limit: int = 6) -> str:
    """`a, b, c and 4 more`: the first `limit` of `items` for a one-line message."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def at_least(name: str, value: float, low: float, *, strict: bool = False) -> None:
    """`name` must be >= low (> low when strict)."""
    if value <= low if strict else value < low:
        raise ValueError(f"{name}={value} must be {'>' if strict else '>='} {low}")


def one_of(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {list(valid)}")

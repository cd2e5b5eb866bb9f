"""How an error message names an option the user can set: as the command line's flag when vlmkit runs as a
command, else as Python's keyword (beside the flag).

    raise ValueError(f"... or pass {option('data_policy_skip')} to drop them")
    with command_line_spelling():   # vlmkit/cli.py runs every verb inside this
        ...                         # -> "... or pass --data-policy skip to drop them"

A library message is built wherever the fault is found, deep under the verb that asked; the spelling is the
caller's, so it is a context variable the CLI sets once rather than an argument threaded through every call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_COMMAND_LINE = contextvars.ContextVar("vlmkit_command_line", default=False)

# option -> (as the command line spells it, as a Python caller reads it)
SPELLINGS = {
    "data_policy_skip": ("--data-policy skip",
                         ("--data-policy skip (from Python: policy='skip' for load_dataset, data_policy='skip' for "
                          "RunConfig)")),
    "image_root": ("--image-root DIR", "--image-root DIR (from Python: image_root=)"),
}


def option(name: str) -> str:
    """How the caller spells option name (a key of SPELLINGS): the flag under command_line_spelling, else the
    flag with the Python keyword."""
    flag, python = SPELLINGS[name]
    return flag if _COMMAND_LINE.get() else python


@contextlib.contextmanager
def command_line_spelling() -> Iterator[None]:
    """Within this block, option() gives the command line's flags alone."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)

"""The one base class of errors a user can fix, and how the command line reports them.

Its message is the single line the command line prints (`scaling-fl: error: ...`, exit
code 2 before a run starts); the original cause stays attached (`raise ... from exc`) and
is printed as a traceback when SCALING_FL_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import traceback

DEBUG_VARIABLE = "SCALING_FL_DEBUG"
EXIT_BAD_INPUT = 2  # a UserError before the run started: nothing was recorded
EXIT_RECORD_LOST = 3  # training finished but the run record was lost mid-run


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line that names the fix."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def print_error(error: BaseException | str, prog: str = "scaling-fl") -> None:
    """`prog: error: <one line>` on stderr; with SCALING_FL_DEBUG=1 the traceback follows, with every
    cause and context, also those a one-line message hides (`raise ... from None`)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    if isinstance(error, BaseException) and debug_enabled():
        print(debug_traceback(error), file=sys.stderr, end="", flush=True)


def debug_traceback(error: BaseException) -> str:
    """The traceback of `error` and of each exception it came from, oldest first, as Python prints a
    chain, but also through `from None` (which is there to keep the user's line short)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    parts = []
    for older, newer in zip([None, *reversed(chain)], reversed(chain)):
        if older is not None:
            parts.append(_DIRECT_CAUSE if newer.__cause__ is older else _CONTEXT)
        parts.extend(traceback.format_exception(type(newer), newer, newer.__traceback__, chain=False))
    return "".join(parts)


_DIRECT_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

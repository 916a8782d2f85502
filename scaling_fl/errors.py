"""The one base class of errors a user can fix.

Its message is the single line the command line prints (`scaling-fl: error: ...`, exit
code 2 before a run starts); the original cause stays attached (`raise ... from exc`) and
is printed as a traceback when SCALING_FL_DEBUG=1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line that names the fix."""

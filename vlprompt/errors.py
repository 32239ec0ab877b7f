"""User mistakes, told apart from bugs.

A `UserError` is something the user can fix (a config value, a missing file, a busy run folder):
its message names the key, file or value and the fix, and the command-line tools print that one
message and exit with status 2. Anything else is a bug and keeps its traceback. Setting
VLPROMPT_TRACEBACK=1 shows the traceback of user errors too.
"""
import os
import sys
from typing import Callable

TRACEBACK_VARIABLE = "VLPROMPT_TRACEBACK"
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; the message says which value, file or key, and how."""


def report_user_errors(main: Callable[[], object]) -> Callable[[], object]:
    """Run `main`; a UserError becomes one line on stderr and exit status 2."""
    def guarded():
        try:
            return main()
        except UserError as err:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
    return guarded


class InvalidValue(UserError, ValueError):
    """A setting or option with a value that is not allowed; the message names its key and what is."""

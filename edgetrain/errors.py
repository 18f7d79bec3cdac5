"""The one exception type for mistakes a user can make (bad flag, missing file, ...).

The CLI turns a `UserError` into a one-line message and exit code 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by user input: reported as one line, exit code 2."""

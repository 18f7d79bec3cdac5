"""The one exception type for mistakes a user can make (bad flag, missing file, ...).

The CLI turns a `UserError` into a one-line message and exit code 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by user input: reported as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty):
    how a library's multi-line error becomes part of a one-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Stopped(UserError):
    """Training stopped on a signal (SIGINT / SIGTERM) after writing a resumable checkpoint:
    one line (it names the resume command), exit code 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

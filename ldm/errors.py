"""User-facing errors.

Anything a user can cause (a missing file, a checkpoint that does not fit its config, a bad size)
raises SDError with one line that says what is wrong and what to do. The CLI prints that line and
exits non-zero; library code never exits the process.
"""


import sys


class SDError(Exception):
    """A failure caused by the user's input, reported as one line without a traceback."""


def note(message: str) -> None:
    """Tell the user about something that is fine but worth knowing, as one "note:" line on stderr."""
    print(f"note: {message}", file=sys.stderr)


def warning(message: str) -> None:
    """A one-line "warning:" on stderr: what the user asked for runs, but probably not as they expect."""
    print(f"warning: {message}", file=sys.stderr)

"""The `sd` console script's first module: signals are handled before anything heavy is imported.

Importing the command line (typer, and for most commands torch) takes a second or more; a Ctrl-C in that
time would otherwise print a long traceback from the middle of an import (or, for a C extension cut off
half-way, "cannot load module more than once"). Until a command is ready to work (`ready_for_interrupts`,
called just before it starts writing anything), an interrupt ends the process at once with one line;
from then on Ctrl-C raises KeyboardInterrupt, which ldm.cli.main turns into its clean stop (SIGTERM too).
"""
import os
import signal
import sys


def _stop_while_importing(signum, frame) -> None:
    print("interrupted before anything was written", file=sys.stderr)
    os._exit(128 + signum)


def main(argv=None, command=None) -> int:
    """Run `sd` (with `command` put in front of the arguments: scripts/txt2img.py passes "txt2img")."""
    signal.signal(signal.SIGINT, _stop_while_importing)
    from ldm.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    return cli_main([command, *args] if command else args)


def ready_for_interrupts() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt (the command cleans up and says how to resume); until
    now it ended the process at once. A no-op where `main` did not set the early handler (tests, imports)."""
    try:
        if signal.getsignal(signal.SIGINT) is _stop_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass

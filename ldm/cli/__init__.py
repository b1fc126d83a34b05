"""The `sd` command line: a thin Typer app (app.py) over the ldm package, one module per command.

This file stays light, so that the console script's first module (entry.py) sets its signal handler
before typer or torch are imported.
"""
from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `sd` with `argv` (default sys.argv[1:]); returns the exit code (ldm.cli.app.main)."""
    from ldm.cli.app import main as run

    return run(argv)

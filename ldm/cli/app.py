"""The `sd` command: a thin Typer app over the ldm package.

Every command turns user mistakes into one line on stderr and a non-zero exit; a traceback means a
bug in sd, never a bad input.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional, Sequence

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from ldm.errors import SDError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Stable Diffusion 2.x: txt2img and friends with the reference's flags, configs and output layout.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Stable Diffusion 2.x: txt2img and friends with the reference's flags, configs and output layout."""


# Command modules, each adding its commands to `app` when imported.
COMMAND_MODULES = ("txt2img", "samplers", "img2img", "inpaint", "depth2img", "upscale", "info", "train", "serve",
                   "prompt", "variations")


def _register_commands() -> None:
    # Imported here, not at the top, so that importing ldm.cli stays cheap; no command module imports torch
    # at import time, so `sd --help` does not either (tests/test_pipeline.py checks it).
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"ldm.cli.{name}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop` and SLURM send), raised where the program is, so that it stops
    the way Ctrl-C does: temp files removed, the resume hint printed."""


_SIGNALLED: list[int] = []  # the SIGTERM seen, kept because click re-raises interrupts as its own Abort


def _terminate(signum, frame) -> None:
    _SIGNALLED.append(signum)
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `sd` command line (argv: the arguments after `sd`); returns the process exit code."""
    import signal

    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _terminate)
    _SIGNALLED.clear()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: list[str]) -> int:
    try:
        _register_commands()
        # With standalone_mode=False typer returns a command's exit code instead of exiting; it turns
        # Ctrl-C into 130.
        code = app(args, prog_name="sd", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            return code
    except SDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort, keeping it as the cause
        terminated = bool(_SIGNALLED)  # _terminate records every SIGTERM before raising Terminated
        what = "terminated" if terminated else "interrupted"
        print(f"{what}: no partial image was written (a batch run resumes with --skip-existing)", file=sys.stderr)
        return 143 if terminated else 130
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.ClickException as exc:
        # Usage errors: one line plus where to look, instead of click's boxed usage text.
        command = " ".join(a for a in args[:1] if not a.startswith("-"))
        print(f"error: {exc.format_message()} (see: sd {command + ' ' if command else ''}--help)", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("error: out of memory; try a smaller --H/--W or --n_samples", file=sys.stderr)
        return 1
    return 0

"""The reference's gradio demo command lines (scripts/gradio/*.py CONFIG CKPT) as `sd serve` with a tab first."""
from __future__ import annotations

import sys


def serve_tab(tab: str, argv: list[str]) -> int:
    """`sd serve --config CONFIG --ckpt CKPT --tab TAB [more flags]` from the reference's positional form."""
    from ldm.cli.entry import main

    positional = [a for a in argv[:2] if not a.startswith("-")]
    if len(positional) != 2:
        print(f"usage: {sys.argv[0]} CONFIG CKPT [sd serve flags]  (the reference's form)", file=sys.stderr)
        return 2
    config, ckpt = positional
    return main(command="serve", argv=["--config", config, "--ckpt", ckpt, "--tab", tab, *argv[2:]])

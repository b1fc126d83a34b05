#!/usr/bin/env python3
"""The reference's `python scripts/gradio/superresolution.py CONFIG CKPT`: `sd serve` with the upscale tab first.

Further flags go to `sd serve` (--host, --port, --api-auth ...). Works from a checkout without installing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ldm.cli.reference_scripts import serve_tab  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve_tab("upscale", sys.argv[1:]))

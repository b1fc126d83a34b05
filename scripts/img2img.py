#!/usr/bin/env python3
"""Reference-style entry point: `python scripts/img2img.py --init-img IMG --prompt ... --ckpt ...` = `sd img2img ...`.

Works from a checkout without installing the package (the reference's "No module named ldm").
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(command="img2img"))

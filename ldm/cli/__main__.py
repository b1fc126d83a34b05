"""`python -m ldm.cli ARGS`: `sd ARGS` where the console script is not installed (e.g. `python -m ldm.cli train`)."""
import sys

from ldm.cli.entry import main

if __name__ == "__main__":
    sys.exit(main())

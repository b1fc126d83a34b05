"""python -m ldm.training --config CONFIG [...]: `sd train` where the console script is not installed."""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

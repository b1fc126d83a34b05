"""python -m ldm.training --config CONFIG [--max-minutes M] [--max-steps N] [--output PATH] [--init-from CKPT]

The same entry as `sd train` for environments where the CLI is not installed.
"""
import argparse
import sys

from ldm.errors import SDError
from ldm.training.trainers import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.training", description="train the demo model stages")
    parser.add_argument("--config", required=True)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--output")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", help="continue from this checkpoint of the same model")
    args = parser.parse_args(argv)
    try:
        path = train(args.config, max_minutes=args.max_minutes, max_steps=args.max_steps, output=args.output,
                     seed=args.seed, init_from=args.init_from)
    except SDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

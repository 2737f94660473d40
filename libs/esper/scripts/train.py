"""`python -m esper.scripts.train heuristic ...` is `esper train heuristic ...`."""

import sys

from esper.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))

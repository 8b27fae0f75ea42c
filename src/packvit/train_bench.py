"""``python -m packvit.train_bench``: the same as ``packvit bench --suite training``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "training", *sys.argv[1:]]))

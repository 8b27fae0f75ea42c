"""``python -m packvit.embed.bench``: the same as ``packvit bench --suite files``."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "files", *sys.argv[1:]]))

"""`python -m mistral4_jax.convert SRC DST ...`: the same as `mistral4-jax convert SRC DST ...`."""

import sys

from mistral4_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

"""`python -m mistral4_jax.cli ...`: the same as the `mistral4-jax` console script."""

import sys

from mistral4_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())

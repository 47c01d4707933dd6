"""`python -m headroom`: the same command line as the `headroom` console script."""

from .cli import main

if __name__ == "__main__":
    main()

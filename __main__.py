"""`python -m hearth ...` is the `hearth` command."""

import sys

from hearth.cli import main

if __name__ == "__main__":  # not in spawned tensor-parallel workers
    sys.exit(main())

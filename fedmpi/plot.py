"""`python -m fedmpi.plot`: a shim for fedmpi.cli.plot, kept so documented commands keep working."""

import sys

from fedmpi.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())

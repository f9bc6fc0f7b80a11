"""`python -m fedmpi.sweep`: a shim for fedmpi.cli.sweep, kept so documented commands keep working."""

import sys

from fedmpi.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())

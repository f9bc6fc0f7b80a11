"""`python -m fedmpi.comm`: a shim for fedmpi.cli.comm, kept so documented commands keep working."""

import sys

from fedmpi.cli.comm import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m fedmpi.evaluate`: a shim for fedmpi.cli.evaluate, kept so documented commands keep working."""

import sys

from fedmpi.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

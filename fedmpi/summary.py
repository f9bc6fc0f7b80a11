"""`python -m fedmpi.summary`: a shim for fedmpi.cli.summary, kept so documented commands keep working."""

import sys

from fedmpi.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())

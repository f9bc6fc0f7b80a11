"""`python -m fedmpi.extractors`: a shim for fedmpi.cli.extractors, kept so documented commands keep working."""

import sys

from fedmpi.cli.extractors import main

if __name__ == "__main__":
    sys.exit(main())

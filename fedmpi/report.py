"""`python -m fedmpi.report`: a shim for fedmpi.cli.report, kept so documented commands keep working."""

import sys

from fedmpi.cli.report import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m fedmpi.data split ...` (see fedmpi.cli.data)."""

import sys

from fedmpi.cli.data import main

sys.exit(main())

"""`python -m fedmpi.train ...`: the launch form HPC users type (see fedmpi.cli.train)."""

import sys

from fedmpi.cli.train import main

sys.exit(main())

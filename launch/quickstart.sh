#!/usr/bin/env bash
# Fresh machine to first samples: set-up, then the quickstart as a federated job
# (1 federator + 2 clients, FULL). Samples land in runs/quickstart-*/samples/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/local.sh 3 configs/quickstart.yaml "$@"

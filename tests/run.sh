#!/usr/bin/env bash
# Install (once, into .venv) and run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
"$PYTHON" -m pytest -q "$@"

# Sourced by examples/quickstart.sh and tests/run.sh: make .venv (once) and install megatron_gdn into it.
# The venv sees the system's packages, so a machine that already has a (CUDA) torch keeps it; on a bare
# machine torch 2.13.0 is installed (a CPU build where one is on local disk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv --system-site-packages "$ROOT/.venv"
fi
PYTHON="$ROOT/.venv/bin/python"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e "$ROOT[test]"
export PYTHON

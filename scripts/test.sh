#!/usr/bin/env bash
# The test suite: set up (once), lint, then run every test with line coverage of dscompile (at least 90%).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
.venv/bin/ruff check dscompile tests bench examples
exec .venv/bin/pytest --durations=15 --cov=dscompile --cov-report=term --cov-fail-under=90 "$@"

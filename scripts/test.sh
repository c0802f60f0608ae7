#!/usr/bin/env bash
# The test suite: set up (once), lint, then run every test with line coverage of dscompile (at least 90%).
# Test files run in parallel, one worker per core up to 4 (DSCOMPILE_TEST_WORKERS overrides; 0 runs in this
# process): most of a test's time is single-threaded tracing and compiling, so two workers on two cores finish
# far sooner than one worker with two threads. Each worker's torch gets its share of the cores (tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
.venv/bin/ruff check dscompile tests bench examples
cores="$(nproc 2>/dev/null || echo 1)"
read -r quota period 2>/dev/null < /sys/fs/cgroup/cpu.max || quota=max
if [ "$quota" != max ] && [ $(( (quota + period - 1) / period )) -lt "$cores" ]; then
  cores=$(( (quota + period - 1) / period ))  # a container's CPU quota, not the host's cores
fi
export DSCOMPILE_TEST_CORES="$cores"
workers="${DSCOMPILE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
exec .venv/bin/pytest "${parallel[@]}" --durations=15 --cov=dscompile --cov-report=term --cov-fail-under=90 "$@"

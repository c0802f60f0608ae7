#!/usr/bin/env bash
# The main job: set up (once) and optimize the embedded default model under the balanced profile (MLA + MoE +
# MTP), printing the diff and the before/after table. Extra arguments go to `dscompile optimize` (for example
# --profile none, --heal-minutes 20 or --lower eager).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/dscompile" optimize --model smollm2 --profile balanced "$@"

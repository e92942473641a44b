# Sourced by script/demo.sh and script/test.sh (from the repository root): ensure_env [dev] makes sure the
# virtual environment .env holds requirements.txt (and requirements-dev.txt with "dev"), then sets PYTHON.
#
# - PYTHON=/path/to/python set by the caller: nothing is installed, that interpreter is used as it is.
# - .env missing or broken (no working bin/python): created with ${VENV_PYTHON:-python3} -m venv.
# - A requirements file whose sha256 differs from the stamp .env/.stamp-<file>.sha256 (or has no stamp) is
#   installed with pip; the stamp is written only after pip succeeded, so a failed or interrupted install is
#   redone by the next run and a second run with nothing changed installs nothing.
# - pip's output goes to .cache/env-install.log; on failure its ERROR lines (they name the requirement) and
#   its last lines are shown.

ENV_DIR=.env
ENV_LOG=.cache/env-install.log

_env_python_works() {
  [ -x "$ENV_DIR/bin/python" ] && "$ENV_DIR/bin/python" -c "import sys" >/dev/null 2>&1
}

_env_stamp() { echo "$ENV_DIR/.stamp-$1.sha256"; }

_env_hash() { sha256sum "$1" | cut -d' ' -f1; }

_env_create() {
  local base="${VENV_PYTHON:-python3}"
  if ! command -v "$base" >/dev/null 2>&1; then
    echo "error: $base not found; install Python >= 3.10, or set VENV_PYTHON=/path/to/python3" \
         "(or PYTHON=/path/to/python to use an environment you manage yourself)." >&2
    return 2
  fi
  if ! "$base" -c "import sys; sys.exit(sys.version_info < (3, 10))"; then
    echo "error: $base is Python $("$base" -c 'import platform; print(platform.python_version())');" \
         "this repo needs >= 3.10. Set VENV_PYTHON=/path/to/python3.10+ (or PYTHON=...)." >&2
    return 2
  fi
  if [ -e "$ENV_DIR" ] || [ -L "$ENV_DIR" ]; then
    echo "== $ENV_DIR has no working bin/python (an interrupted set-up?): removing it and starting again"
    rm -rf "$ENV_DIR"
  fi
  echo "== creating the virtual environment $ENV_DIR with $base ($("$base" -c 'import platform; print(platform.python_version())'))"
  if ! "$base" -m venv "$ENV_DIR"; then
    rm -rf "$ENV_DIR"
    echo "error: '$base -m venv $ENV_DIR' failed. On Debian/Ubuntu install the venv module" \
         "(apt install python3-venv), or set PYTHON=/path/to/python to use your own environment." >&2
    return 2
  fi
}

ensure_env() {
  local with_dev="${1:-}"
  if [ -n "${PYTHON:-}" ]; then
    echo "== using PYTHON=$PYTHON as it is (no set-up of $ENV_DIR)"
    export PYTHON
    return 0
  fi
  local files=(requirements.txt)
  if [ "$with_dev" = dev ]; then files+=(requirements-dev.txt); fi
  _env_python_works || _env_create || return $?
  local stale=() f
  for f in "${files[@]}"; do
    if [ "$(cat "$(_env_stamp "$f")" 2>/dev/null)" != "$(_env_hash "$f")" ]; then stale+=("$f"); fi
  done
  if [ ${#stale[@]} -gt 0 ]; then
    local args=() start=$SECONDS
    for f in "${stale[@]}"; do args+=(-r "$f"); done
    mkdir -p "$(dirname "$ENV_LOG")"
    echo "== installing ${stale[*]} into $ENV_DIR (a few minutes the first time; log: $ENV_LOG)"
    if ! "$ENV_DIR/bin/python" -m pip install --disable-pip-version-check "${args[@]}" >"$ENV_LOG" 2>&1; then
      echo "error: pip could not install ${stale[*]} (the environment is not marked as ready; the next run" \
           "tries again). pip's errors:" >&2
      grep -E "^ERROR:|^error:" "$ENV_LOG" | sed 's/^/  /' >&2 || true
      echo "last lines of $ENV_LOG (without pip's 'Location ... is ignored' warnings):" >&2
      grep -v "is ignored" "$ENV_LOG" | tail -n 15 | sed 's/^/  /' >&2
      return 1
    fi
    for f in "${stale[@]}"; do _env_hash "$f" >"$(_env_stamp "$f")"; done
    echo "== $ENV_DIR ready in $((SECONDS - start)) s"
  else
    echo "== $ENV_DIR is up to date with ${files[*]} (nothing to install)"
  fi
  PYTHON="$ENV_DIR/bin/python"
  export PYTHON
}

#!/usr/bin/env bash
# The test suite from a fresh clone: sets up .env (requirements.txt + requirements-dev.txt) when it is missing
# or a requirements file changed (script/lib/env.sh), then lint (ruff check, ruff format --check) and pytest.
#   bash script/test.sh                         # everything (CPU only)
#   bash script/test.sh -k dual -x              # extra arguments go to pytest
#   bash script/test.sh tests/setup             # only these tests (pytest's default is tests/, see pyproject.toml)
#   PYTHON=/path/to/python bash script/test.sh  # an environment you manage yourself: nothing is installed
set -euo pipefail
cd "$(dirname "$0")/.."
source script/lib/env.sh
ensure_env dev
if ! "$PYTHON" -c "import pytest, ruff" 2>/dev/null; then
  echo "error: $PYTHON lacks pytest or ruff: $PYTHON -m pip install -r requirements-dev.txt" >&2
  exit 2
fi
echo "== lint: ruff check . && ruff format --check ."
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
echo "== tests: pytest -q $*"
export HF_HUB_OFFLINE=1
exec "$PYTHON" -m pytest -q "$@"

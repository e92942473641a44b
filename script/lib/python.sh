# Sourced by the scripts under script/ (after they cd to the repository root): which Python runs the code.
#   PYTHON  the caller's choice; else the repo's virtual environment .env/bin/python when it exists; else python3
#   LAUNCH  the caller's choice; else accelerate's launcher run by that same Python
#           ("$PYTHON -m accelerate.commands.launch", which is what `accelerate launch` runs), so a bare
#           `accelerate` on PATH is never needed. LAUNCH="$PYTHON" runs a trainer as a plain process.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .env/bin/python ]; then
    PYTHON=.env/bin/python
  else
    PYTHON=python3
  fi
fi
LAUNCH="${LAUNCH:-$PYTHON -m accelerate.commands.launch}"
export PYTHON

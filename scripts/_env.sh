# Shared set-up for the scripts: a virtualenv in .venv with the project installed, the embedded
# Dagster instance in .dagster_home and the MLflow store under mlruns/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# GBM_EXTRAS: the optional dependency groups to install (CI adds "formats"); a change reinstalls.
EXTRAS="${GBM_EXTRAS:-dev}"
STAMP=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-$(echo "$EXTRAS" | tr -c 'A-Za-z0-9\n' '_')
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export DAGSTER_HOME="${DAGSTER_HOME:-$ROOT/.dagster_home}"
export KERAS_BACKEND=tensorflow
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
mkdir -p "$DAGSTER_HOME" mlruns data

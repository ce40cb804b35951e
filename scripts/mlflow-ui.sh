#!/usr/bin/env bash
# The MLflow UI over the project's store (mlruns/mlflow.db, artifacts under mlruns/) on http://127.0.0.1:5000
source "$(dirname "$0")/_env.sh"
exec mlflow ui --backend-store-uri "sqlite:///$ROOT/mlruns/mlflow.db" \
  --default-artifact-root "$ROOT/mlruns/artifacts" --host 127.0.0.1 --port "${PORT:-5000}"

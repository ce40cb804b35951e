#!/usr/bin/env bash
# The Dagster UI (and daemon, for the sensor and schedules) on http://127.0.0.1:3000.
# The webserver runs behind the project's guard (gbm_assets/ui_guard.py): other web pages open in the
# same browser cannot drive it (no GraphQL mutations over GET, Host and Origin checked). Behind a
# reverse proxy, list the names it serves the UI as in GBM_UI_ALLOWED_HOSTS (docs/deployment.md).
# Ctrl-C stops both; if the daemon stops, the UI stops too (as `dagster dev` did).
source "$(dirname "$0")/_env.sh"
exec python -m gbm_assets.ui_guard --daemon -w workspace.yaml --host 127.0.0.1 --port "${PORT:-3000}"

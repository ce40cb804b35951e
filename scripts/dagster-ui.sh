#!/usr/bin/env bash
# The Dagster UI (and daemon, for the sensor and schedules) on http://127.0.0.1:3000
source "$(dirname "$0")/_env.sh"
exec dagster dev -w workspace.yaml -h 127.0.0.1 -p "${PORT:-3000}"

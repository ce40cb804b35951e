#!/usr/bin/env bash
# Install, then run the main job end to end on the embedded default (synthetic plates if data/raw is empty).
source "$(dirname "$0")/_env.sh"
exec gbm-assets run "$@"

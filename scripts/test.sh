#!/usr/bin/env bash
# Install, then run the test suite (slow tests excluded unless you pass -m slow or -m "").
source "$(dirname "$0")/_env.sh"
exec python -m pytest -m "not slow" -p no:cacheprovider "$@"

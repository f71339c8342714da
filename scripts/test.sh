#!/usr/bin/env bash
# The README's test command: install the test extras (and Chromium for the browser test), then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
python -m pip install -q -r requirements-test.txt
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"
fi
python -m pytest -q "$@"

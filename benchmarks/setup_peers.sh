#!/usr/bin/env bash
# Installs the peers qwen-engine is measured against into their own virtual environment (never a project
# dependency): llama.cpp through llama-cpp-python (built here from its source release, for this CPU), and
# transformers. Usage: bash benchmarks/setup_peers.sh [VENV]   (default: .bench-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.bench-venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -e '.[demo]'
"$venv/bin/pip" install -q 'transformers==5.23.0' 'accelerate==1.15.0' 'psutil'
CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q --no-cache-dir 'llama-cpp-python==0.3.36'
echo "peers installed in $venv"

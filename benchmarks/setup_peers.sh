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
# Not GGML_NATIVE: this CPU reports AMX, but using it crashes here (a segfault in ggml_backend_amx_mul_mat), so
# the AVX-512 paths are chosen explicitly and AMX is left out.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF" "$venv/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==0.3.36'
"$venv/bin/pip" install -q 'llama-cpp-python==0.3.36'
echo "peers installed in $venv"

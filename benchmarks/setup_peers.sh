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
# Not GGML_NATIVE: a CPU that reports AMX crashed in it here (a segfault in ggml_backend_amx_mul_mat), so the
# instruction sets are chosen explicitly from what this CPU has, and AMX is always left out.
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo; then
  flags="$flags -DGGML_AVX512=ON"
  grep -qw avx512vbmi /proc/cpuinfo && flags="$flags -DGGML_AVX512_VBMI=ON"
  grep -qw avx512_vnni /proc/cpuinfo && flags="$flags -DGGML_AVX512_VNNI=ON"
  grep -qw avx512_bf16 /proc/cpuinfo && flags="$flags -DGGML_AVX512_BF16=ON"
fi
CMAKE_ARGS="$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  "$venv/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==0.3.36'
"$venv/bin/pip" install -q 'llama-cpp-python==0.3.36'
# llama.cpp's own HTTP server (what ollama runs), from the same release's sources, for benchmarks/serve.py;
# static, so the binary stands alone in $venv/bin.
command -v cmake > /dev/null || "$venv/bin/pip" install -q cmake
PATH="$(cd "$venv/bin" && pwd):$PATH"
src="$(mktemp -d)"
"$venv/bin/pip" download -q --no-deps --no-binary :all: 'llama-cpp-python==0.3.36' -d "$src"
tar xzf "$src"/llama_cpp_python-0.3.36.tar.gz -C "$src"
cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release $flags \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > /dev/null
cmake --build "$src/build" --target llama-server -j"$(nproc)" > "$src/build.log" 2>&1 \
  || { tail -30 "$src/build.log"; echo "building llama-server failed"; exit 1; }
cp "$src/build/bin/llama-server" "$venv/bin/llama-server"
rm -rf "$src"
echo "peers installed in $venv"

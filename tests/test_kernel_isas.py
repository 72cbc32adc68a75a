"""The kernel sources compile for the instruction sets this machine's own build does not take.

The extension is built with -march=native, so a host only ever compiles one of the sources' ISA branches
(AVX-512, AVX2, portable). An AVX2-only error once went unnoticed on an AVX-512 host: AVX2 machines then fell
back to dequantise + matmul with a one-line warning. This checks (-fsyntax-only, with the build's flags) the
AVX2 branch everywhere, and the AVX-512 one (with AMX and VNNI) where the host lacks it.

The portable branch is built and imported here (x86-64 without AVX), since a syntax check misses what only the
loader sees: a call into a source whose whole body is inside an ISA branch left an unresolved symbol, and the
module did not load on such CPUs. Where a 64-bit ARM cross compiler is installed (Debian:
g++-aarch64-linux-gnu), the sources are also syntax-checked for ARM, which proves no x86 header is included
outside the x86 branches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from qwen_engine import kernels

# (compiler, -march): an AVX2 + FMA + F16C CPU without VNNI, a plain 64-bit ARM one, an AVX-512 one with AMX,
# VNNI and VBMI.
AVX2, AVX512 = ("c++", "haswell"), ("c++", "sapphirerapids")
ARM = "aarch64-linux-gnu-g++"

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def host_has_avx512() -> bool:
    probe = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "-"], input="",
                           capture_output=True, text=True, timeout=60)
    return "__AVX512F__" in probe.stdout


def targets() -> list[tuple[str, str]]:
    return ([AVX2] + ([] if host_has_avx512() else [AVX512])
            + ([(ARM, "armv8-a")] if shutil.which(ARM) else []))


def syntax_check(source: str, compiler: str, march: str) -> subprocess.CompletedProcess:
    includes = [f for path in include_paths() for f in ("-isystem", path)]
    flags = ["-DTORCH_EXTENSION_NAME=isa_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "-fPIC", "-std=c++20",
             *kernels.BASE_FLAGS, f"-march={march}"]
    return subprocess.run([compiler, *flags, *includes, "-isystem", sysconfig.get_paths()["include"],
                           "-fsyntax-only", source], capture_output=True, text=True, timeout=600)


def test_sources_compile_for_every_isa_branch() -> None:
    jobs = [(str(source), *target) for target in targets() for source in kernels.SOURCES]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda job: syntax_check(*job), jobs))
    failures = [f"{compiler} -march={march} {os.path.basename(source)}:\n{r.stderr[:2000]}"
                for (source, compiler, march), r in zip(jobs, results, strict=True) if r.returncode != 0]
    assert not failures, "\n".join(failures)


# Built and imported in a process of its own: the test process has loaded the native build, and pybind11 allows
# one Python type per C++ class (DecodeStep) across the modules of a process.
PORTABLE_CHECK = """
import sys
from torch.utils.cpp_extension import load
from qwen_engine import kernels

# -O0: this checks that the module links and loads, not its speed (the build takes ~4x less time)
flags = [*kernels.BASE_FLAGS, "-march=x86-64-v2", "-O0"]
module = load(name="qwen_engine_portable_check", sources=[str(s) for s in kernels.SOURCES], extra_cflags=flags,
              extra_ldflags=["-fopenmp"], build_directory=sys.argv[1], verbose=False)
print(module.has_avx512(), module.bf16_kernels(), hasattr(module, "int8_linear_units"),
      hasattr(module, "DecodeStep"), hasattr(module, "linear"))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="builds the x86-64 portable variant")
def test_portable_build_loads(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, str(tmp_path)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    # no AVX-512 or bf16 kernels, no int8 products (the Python side then offers no int8 modes), the rest there
    assert run.stdout.split() == ["False", "False", "False", "True", "True"]

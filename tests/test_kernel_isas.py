"""The kernel sources compile for the instruction sets this machine's own build does not take.

The extension is built with -march=native, so a host only ever compiles one of the sources' ISA branches
(AVX-512, AVX2, portable). An AVX2-only error once went unnoticed on an AVX-512 host: AVX2 machines then fell
back to dequantise + matmul with a one-line warning. This checks (-fsyntax-only, with the build's flags) the
AVX2 and portable branches everywhere, and the AVX-512 one (with AMX and VNNI) where the host lacks it. The
portable branch is checked for 64-bit ARM where a cross compiler is installed (Debian: g++-aarch64-linux-gnu),
which also proves no x86 header is included outside the x86 branches; else for plain x86-64.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import include_paths

from qwen_engine import kernels

# (compiler, -march): an AVX2 + FMA + F16C CPU without VNNI, a plain 64-bit ARM or x86 one, an AVX-512 one
# with AMX, VNNI and VBMI.
AVX2, AVX512 = ("c++", "haswell"), ("c++", "sapphirerapids")
ARM = "aarch64-linux-gnu-g++"
PORTABLE = (ARM, "armv8-a") if shutil.which(ARM) else ("c++", "x86-64-v2")


def host_has_avx512() -> bool:
    probe = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "-"], input="",
                           capture_output=True, text=True, timeout=60)
    return "__AVX512F__" in probe.stdout


def targets() -> list[tuple[str, str]]:
    return [AVX2, PORTABLE] + ([] if host_has_avx512() else [AVX512])


def syntax_check(source: str, compiler: str, march: str) -> subprocess.CompletedProcess:
    includes = [f for path in include_paths() for f in ("-isystem", path)]
    flags = ["-DTORCH_EXTENSION_NAME=isa_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "-fPIC", "-std=c++20",
             *kernels.BASE_FLAGS, f"-march={march}"]
    return subprocess.run([compiler, *flags, *includes, "-isystem", sysconfig.get_paths()["include"],
                           "-fsyntax-only", source], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_sources_compile_for_every_isa_branch() -> None:
    jobs = [(str(source), *target) for target in targets() for source in kernels.SOURCES]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda job: syntax_check(*job), jobs))
    failures = [f"{compiler} -march={march} {os.path.basename(source)}:\n{r.stderr[:2000]}"
                for (source, compiler, march), r in zip(jobs, results, strict=True) if r.returncode != 0]
    assert not failures, "\n".join(failures)

"""Native kernels: matrix products that read GGUF-quantised weights directly (quant_matmul.cpp; prefill on
AMX tiles where the CPU has them, amx_linear.cpp), decode attention over the paged KV cache
(paged_attention.cpp), whole decode steps (decode_step.cpp), the lossy w8a8 mode's int8 products
(int8_matmul.cpp) and one token of Qwen3.5's gated delta rule (delta_rule.cpp).

The extension is compiled with the machine's C++ compiler on first use (about a minute) and cached under
`~/.cache/qwen-engine/kernels/<hash of the sources, flags, the CPU's instruction sets and torch version>` (or $QWEN_ENGINE_KERNEL_CACHE),
so later processes load it in milliseconds. The cache is a build artefact of this machine, shared by every
QWEN_ENGINE_HOME. Without
a compiler (or with QWEN_ENGINE_KERNELS=0) `native()` returns None and callers use the pure-PyTorch path:
dequantise, then matmul — the same numbers, slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(name)
           for name in ("bindings.cpp", "quant_matmul.cpp", "paged_attention.cpp", "prefill_attention.cpp", "decode_step.cpp",
                         "int8_matmul.cpp", "bf16_ops.cpp", "amx_linear.cpp",
                         "segment_attention.cpp", "activations.cpp", "delta_rule.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("quant_blocks.h", "vec_math.h", "kv_rows.h", "amx_linear.h", "amx_tiles.h",
                                                       "tensors.h", "kernels.h", "decode_step.h")]
# FMA contraction off: the dequantisation must round exactly as gguf's numpy code does (d * q - m, not fused).
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]

_module: ModuleType | None = None
_tried = False


def _native_flags() -> tuple[list[str], str]:
    """-march=native where the compiler accepts it (it picks AVX-512 or AVX2 for this CPU), else portable code;
    and what "native" means here: the instruction sets the compiler turns on for this CPU. That goes into the
    cache key, so a cache shared with another machine (a network home, a copied image) never hands this CPU
    code built for instructions it lacks (AMX, AVX-512), which would die on an illegal instruction."""
    # QWEN_ENGINE_KERNEL_ISA=avx2 builds the AVX2 paths on an AVX-512 CPU (to compare the two on one machine).
    march = ["-march=native"] + (["-mno-avx512f"] if os.environ.get("QWEN_ENGINE_KERNEL_ISA") == "avx2" else [])
    try:
        probe = subprocess.run(["c++", *march, "-x", "c++", "-E", "-v", "-", "-o", os.devnull],
                               input="", capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return [], ""
    if probe.returncode != 0:
        return [], ""
    return march, target_of(probe.stderr)


def target_of(verbose_output: str) -> str:
    """The target options in a compiler's -v output: gcc's expanded -m... and --param options, clang's
    -target-cpu and -target-feature values."""
    picked = []
    for line in verbose_output.splitlines():
        if "cc1" not in line:
            continue
        words = line.split()
        for i, word in enumerate(words):
            if word.startswith("-m") or (i > 0 and words[i - 1] in ("--param", "-target-cpu", "-target-feature")):
                picked.append(word)
    return " ".join(picked)


def cache_key(flags: list[str], target: str) -> str:
    """Names a build: its sources, compiler flags, target instruction sets and torch version."""
    digest = hashlib.sha256(" ".join(flags).encode() + b"\0" + target.encode() + b"\0" + torch.__version__.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _build() -> ModuleType:
    native_flags, target = _native_flags()
    flags = BASE_FLAGS + native_flags
    key = cache_key(flags, target)
    root = os.environ.get("QWEN_ENGINE_KERNEL_CACHE") or Path.home() / ".cache" / "qwen-engine" / "kernels"
    directory = Path(root) / key[:16]
    name = f"qwen_engine_quant_{key[:12]}"
    built = directory / f"{name}.so"
    if built.is_file():  # importing torch.utils.cpp_extension alone costs ~2 s; a built module needs none of it
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # as the CLI's "loading …": a terminal user should not wait on a silent build
        print("qwen-engine: compiling the native kernels for this CPU (once; ~1.5 min on 2 cores) …", file=sys.stderr,
              flush=True)
    with build_lock(directory):
        return load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), verbose=False)


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """One build at a time in a directory, by a lock the kernel drops when its holder dies.

    torch's own lock is a plain file that a killed build (SIGKILL, a machine restart) leaves behind; every later
    process then waits for it forever. Holding this lock means no live process is building here, so such a
    leftover file can be removed before torch looks for it."""
    with open(directory / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process builds; released if it dies
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def native() -> ModuleType | None:
    """The compiled extension, building it on first use; None (after one warning line) if it cannot be built."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("QWEN_ENGINE_KERNELS", "1") == "0":
        return None
    try:
        _module = _build()
        if os.environ.get("QWEN_ENGINE_AMX", "1") == "0" and hasattr(_module, "set_amx_prefill"):
            _module.set_amx_prefill(False)  # prefill on MKL float32 even where AMX tiles exist
    except Exception as e:  # no compiler, no headers, a failed build: the slow path still gives the same numbers
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"qwen-engine: native kernels unavailable ({reason[:200]}); using dequantise + matmul",
              file=sys.stderr)
        _module = None
    return _module


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity mask, e.g. a container's share; else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_available_cores() -> None:
    """One intra-op thread per core this process may run on, unless OMP_NUM_THREADS says otherwise (torch's
    default counts the machine's cores, which overcommits under a CPU affinity mask, e.g. in containers)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = available_cores()
    if cores != torch.get_num_threads():
        torch.set_num_threads(cores)


def set_native(module: ModuleType | None) -> None:
    """Force a module (or None, the fallback) — for tests that compare the two paths."""
    global _module, _tried
    _module, _tried = module, True

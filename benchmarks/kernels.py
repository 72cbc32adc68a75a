"""Speed of the quantised matmul kernels on the demo model's real weights (Qwen2.5-Coder-0.5B, Q4_K_M).

    PYTHONPATH=. python benchmarks/kernels.py [--threads 2] [--batches 1,8,32] [--repeat 7]
    PYTHONPATH=. python benchmarks/kernels.py --baseline ~/.cache/qwen-engine/kernels/<hash>/<name>.so
    PYTHONPATH=. python benchmarks/kernels.py --recode-q5-0 none     # the file's Q5_0 blocks, not the engine's re-layout

For each weight kind of a decoder layer — qkv (stacked q/k/v segments, Q5_0 with a Q5_0 or Q8_0 v, bias),
attn_output (Q5_0), gate+up (two stacked 4864x896 Q5_0), ffn_down (4864 → 896, Q4_K in half the layers,
Q6_K in the other half) — and the lm_head (151936x896 Q8_0), it times one pass over every layer's tensor of
that kind (the weights stream from memory as in a real decode step) and prints ms per call and weights per
second for each batch of x rows. The last table adds up one decode step's kernels at batch 1 (24 layers +
lm_head), from the per-kind times and from a pass that calls them in the model's order. By default the weights
are first re-laid as the engine's load re-lays them on this CPU (Q5_0 and Q6_K in lane fields on AVX2 and AMD
AVX-512 hosts, weights/quantized.py), so the kernels timed are the ones the engine runs.

--baseline loads another build of the extension (a .so from the kernel cache) and times it interleaved with
the current one, printing both and the speed-up. The two take turns going first: on this host whichever ran
second after the other was up to 40 % faster. --amx times the current build with its AMX prefill products
against the same build on MKL (prefill sizes: e.g. --batches 128,523), on a CPU with AMX tiles. Times are the minimum over --repeat interleaved repetitions.
Needs the demo model (where the engine keeps it; --model for another GGUF). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from pathlib import Path

import gguf
import torch

from qwen_engine import kernels
from qwen_engine.models.quant import OwnType, block_size, block_type
from qwen_engine.weights.demo import demo_model_path


def model_path(arg: str | None) -> Path:
    return Path(arg) if arg else demo_model_path()


def load_so(path: str):
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(path: Path) -> tuple[dict[str, list], list]:
    """Kind → one (segments, qtypes, bias) call per layer; and all calls of a decode step in the model's order."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only mmap
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}

    def w(name: str) -> torch.Tensor:
        data = t[name].data
        return torch.from_numpy(data.reshape(data.shape[0], -1))

    def qt(name: str) -> int:
        return int(t[name].tensor_type)

    def f(name: str) -> torch.Tensor:
        return torch.from_numpy(t[name].data.copy()).float()

    kinds: dict[str, list] = {"qkv": [], "attn_output": [], "gate+up": [], "down Q4_K": [], "down Q6_K": [],
                              "lm_head": []}
    order = []
    layers = sorted({int(n.split(".")[1]) for n in t if n.startswith("blk.")})
    for i in layers:
        p = f"blk.{i}."
        names = [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
        biased = p + "attn_q.bias" in t  # Qwen2 has q/k/v biases, Qwen3 none
        bias = torch.cat([f(p + "attn_q.bias"), f(p + "attn_k.bias"), f(p + "attn_v.bias")]) if biased else None
        kinds["qkv"].append(([w(n) for n in names], [qt(n) for n in names], bias))
        kinds["attn_output"].append(([w(p + "attn_output.weight")], [qt(p + "attn_output.weight")], None))
        names = [p + "ffn_gate.weight", p + "ffn_up.weight"]
        kinds["gate+up"].append(([w(n) for n in names], [qt(n) for n in names], None))
        down = p + "ffn_down.weight"
        kind = "down Q4_K" if qt(down) == int(gguf.GGMLQuantizationType.Q4_K) else "down Q6_K"
        kinds[kind].append(([w(down)], [qt(down)], None))
        order += [kinds["qkv"][-1], kinds["attn_output"][-1], kinds["gate+up"][-1], kinds[kind][-1]]
    head = "output.weight" if "output.weight" in t else "token_embd.weight"  # tied embeddings
    kinds["lm_head"].append(([w(head)], [qt(head)], None))
    return kinds, order + kinds["lm_head"]


def weight_count(call, K: int) -> int:
    return sum(s.shape[0] for s in call[0]) * K


def in_features(call) -> int:
    segs, qtypes, _ = call
    block, size = block_size(block_type(qtypes[0]))
    return segs[0].shape[1] // size * block


def recode(kinds: dict[str, list], module, to: str) -> None:
    """Q5_0 segments re-encoded in place as the engine's load does on AVX2 and AMD hosts (weights/quantized.py)."""
    q5_0 = int(gguf.GGMLQuantizationType.Q5_0)
    for calls in kinds.values():
        for segs, qtypes, _ in calls:
            for i, (seg, qtype) in enumerate(zip(segs, qtypes, strict=True)):
                if qtype != q5_0:
                    continue
                K = seg.shape[1] // 22 * 32
                if to == "fields" and K % 128 == 0:
                    segs[i], qtypes[i] = module.q5_0_as_fields(seg, K), int(OwnType.Q5_0_FIELDS)
                else:
                    segs[i], qtypes[i] = module.q5_0_as_q8_0(seg, K), int(gguf.GGMLQuantizationType.Q8_0)


def recode_q6_k(kinds: dict[str, list], module) -> None:
    """Q6_K segments re-laid in place as Q6_K_FIELDS, as the engine's load does on AVX2 and AMD hosts."""
    q6_k = int(gguf.GGMLQuantizationType.Q6_K)
    for calls in kinds.values():
        for segs, qtypes, _ in calls:
            for i, (seg, qtype) in enumerate(zip(segs, qtypes, strict=True)):
                if qtype == q6_k:
                    segs[i], qtypes[i] = module.q6_k_as_fields(seg, seg.shape[1] // 210 * 256), int(OwnType.Q6_K_FIELDS)


def run(module, calls, x: torch.Tensor, amx: bool | None = None) -> float:
    if amx is not None:
        module.set_amx_prefill(amx)
    start = time.perf_counter()
    for segs, qtypes, bias in calls:
        module.linear(x, segs, qtypes, bias, 64)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the demo model)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: one per available core)")
    p.add_argument("--batches", default="1,8,32", help="rows of x, comma-separated")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--baseline", help="another build of the extension (.so) to time against")
    p.add_argument("--amx", action="store_true", help="time the AMX prefill products against MKL (same build)")
    p.add_argument("--recode-q5-0", choices=["auto", "none", "q8_0", "fields"], default="auto",
                   help="re-encode the Q5_0 weights first (Q5_0_FIELDS or Q8_0); auto: as the engine's load does on "
                        "this CPU (fields on AVX2 and AMD AVX-512 hosts, else none)")
    p.add_argument("--recode-q6-k", choices=["auto", "none", "fields"], default="auto",
                   help="re-lay the Q6_K weights first (Q6_K_FIELDS); auto: as the engine's load does on this CPU")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        kernels.use_available_cores()
    current = kernels.native()
    if current is None:
        raise SystemExit("the native kernels are not available")
    if args.amx and not current.amx_prefill_available():
        raise SystemExit("this CPU (or kernel) gives no AMX tiles")
    # (name, module, AMX prefill on/off or None to leave the build's setting); "baseline" is the reference.
    if args.amx:
        modules = [("current", current, True), ("baseline", current, False)]
    else:
        modules = [("current", current, None)] + ([("baseline", load_so(args.baseline), None)] if args.baseline else [])
    kinds, order = weights(model_path(args.model))
    fields = "fields" if hasattr(current, "prefers_fields") and current.prefers_fields() else "none"
    if args.recode_q5_0 == "auto":
        args.recode_q5_0 = fields
    if args.recode_q6_k == "auto":
        args.recode_q6_k = fields
    print(f"weights: Q5_0 as {args.recode_q5_0}, Q6_K as {args.recode_q6_k} (--recode-q5-0 / --recode-q6-k)")
    if args.recode_q5_0 != "none":
        recode(kinds, current, args.recode_q5_0)
    if args.recode_q6_k != "none":
        recode_q6_k(kinds, current)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"threads {torch.get_num_threads()}, AVX-512 {current.has_avx512()}, min of {args.repeat}")
    if args.amx:
        print("current: prefill products on AMX tiles; baseline: the same build on MKL float32")

    header = f"{'kernel':<13}{'M':>4}{'calls':>6}{'Mw/call':>9}" + "".join(
        f"{name + ' ms':>14}{'Gw/s':>7}" for name, _, _ in modules) + ("   speed-up" if len(modules) > 1 else "")
    print(header)
    per_call: dict[tuple[str, int, str], float] = {}
    for kind, calls in kinds.items():
        if not calls:
            continue
        K = in_features(calls[0])
        n_weights = sum(weight_count(c, K) for c in calls)
        for M in batches:
            x = torch.randn(M, K)
            best = {name: float("inf") for name, _, _ in modules}
            for _name, module, amx in modules:  # warm-up
                run(module, calls, x, amx)
            for rep in range(args.repeat):
                for name, module, amx in modules[::-1] if rep % 2 else modules:
                    best[name] = min(best[name], run(module, calls, x, amx))
            line = f"{kind:<13}{M:>4}{len(calls):>6}{n_weights / len(calls) / 1e6:>9.2f}"
            for name, _, _ in modules:
                per_call[(kind, M, name)] = best[name] / len(calls)
                line += f"{best[name] / len(calls) * 1e3:>14.3f}{n_weights / best[name] / 1e9:>7.2f}"
            if len(modules) > 1:
                line += f"{best['baseline'] / best['current']:>10.2f}x"
            print(line, flush=True)

    # One decode step at batch 1: every layer's four calls in the model's order, then the lm_head.
    total_weights = sum(weight_count(c, in_features(c)) for c in order)
    print(f"\ndecode step kernels, M=1 ({len(order)} calls, {total_weights / 1e6:.0f}M weights)")
    xs = {in_features(c): torch.randn(1, in_features(c)) for c in order}
    best = {name: float("inf") for name, _, _ in modules}
    for rep in range(args.repeat):
        for name, module, amx in modules[::-1] if rep % 2 else modules:
            if amx is not None:
                module.set_amx_prefill(amx)
            start = time.perf_counter()
            for segs, qtypes, bias in order:
                module.linear(xs[in_features((segs, qtypes, bias))], segs, qtypes, bias, 64)
            best[name] = min(best[name], time.perf_counter() - start)
    for name, _, _ in modules:
        summed = sum(per_call[(kind, 1, name)] * len(calls) for kind, calls in kinds.items() if calls) \
            if 1 in batches else float("nan")
        print(f"  {name:<9} in order {best[name] * 1e3:7.2f} ms ({total_weights / best[name] / 1e9:5.2f} Gw/s)"
              f"   sum of kinds {summed * 1e3:7.2f} ms")
    if len(modules) > 1:
        print(f"  speed-up {best['baseline'] / best['current']:.2f}x")


if __name__ == "__main__":
    main()

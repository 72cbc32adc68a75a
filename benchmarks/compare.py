"""qwen-engine against llama.cpp and transformers on the same GGUF, prompt and thread count.

    bash benchmarks/setup_peers.sh                      # once: the peers, in .bench-venv (not project dependencies)
    python benchmarks/compare.py --runs 3               # the table of medians and ratios

Every measurement runs in a fresh subprocess (so peak RSS is the system's own), the systems alternate run by
run, and all of them get the same token ids: a ~516-token chat prompt rendered with the model's template. For
each run: load time, prefill tokens/s (time to the first generated token), single-stream decode tokens/s over
128 greedy tokens, peak RSS. The greedy tokens are compared across systems.

System `qwen-engine-w8a8` is qwen-engine's optional lossy mode (int8 weights and activations, models/w8a8.py),
`qwen-engine-a8` the one that keeps the GGUF's weights and rounds only the activations to int8, as llama.cpp
does (models/a8.py); --quality prints how far each moves the model (mean KL divergence from the float model, greedy agreement) over a
fixed corpus, and, when llama.cpp is among the systems, how far llama.cpp's own logits are from the float model;
also how far a float16 KV cache (kv_cache_dtype) moves the float model.

With --streams 8,16,32, qwen-engine and llama.cpp also decode N different short chat prompts (~40 tokens each)
at once, 64 greedy tokens per stream: qwen-engine through its continuous-batching engine, llama.cpp through
llama-cpp-python's low-level batch API (N sequences in one context, one llama_decode per step, as llama-server's
parallel slots do). Throughput is the generated tokens of all streams over the decode phase (after every
stream has its first token). --context N makes the single-stream prompt at least N tokens long (more copies of
the module under review), for prefill and decode at longer contexts. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECODE_TOKENS = 128
THREADS = int(os.environ.get("QWEN_ENGINE_BENCH_THREADS", "2"))  # set by the driver from --threads

CODE = '''
def load_orders(path):
    orders = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 4:
                continue
            order_id, customer, amount, status = parts[:4]
            orders.append({"id": int(order_id), "customer": customer, "amount": float(amount), "status": status})
    return orders


def totals_by_customer(orders):
    totals = {}
    for order in orders:
        if order["status"] != "cancelled":
            totals[order["customer"]] = totals.get(order["customer"], 0) + order["amount"]
    return sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
'''


def prompt_messages(copies: int = 3) -> list[dict]:
    """The review prompt; `copies` of the module make it longer (3: ~516 tokens, each one ~150 more)."""
    question = (
        "Review the following Python module. Point out bugs, edge cases that are not handled, and performance "
        "problems, then propose an improved version with type hints and docstrings.\n```python\n"
        + CODE * copies + "```"
    )
    return [{"role": "system", "content": "You are a careful senior Python reviewer."},
            {"role": "user", "content": question}]


TOPICS = ["binary search", "a linked list", "quicksort", "a hash map", "Dijkstra's algorithm", "a trie",
          "merge sort", "a binary heap", "BFS on a grid", "an LRU cache", "the KMP algorithm", "union-find",
          "a ring buffer", "topological sort", "a bloom filter", "reservoir sampling"]
STREAM_TOKENS = 64


def stream_messages(i: int) -> list[dict]:
    style = ["in Python", "in Rust", "in C", "in Go"][i // len(TOPICS) % 4]
    return [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} and implement it {style}."}]


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one system, in its own process ----------------------------------------------------------------------------

def run_qwen_engine(model: str, ids: list[int], quantization: str | None = None, **load) -> dict:
    from qwen_engine import LLM

    start = time.perf_counter()
    llm = LLM(model, progress=False, quantization=quantization, **load)
    return {"load_s": time.perf_counter() - start, **qwen_engine_greedy(llm, ids)}


def qwen_engine_greedy(llm, ids: list[int]) -> dict:
    """Prefill and DECODE_TOKENS greedy tokens through the engine: times and tokens."""
    from qwen_engine import SamplingParams

    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True).with_defaults(SamplingParams())
    seq = llm.engine.add_request(ids, params)
    start = time.perf_counter()
    first = None
    while not seq.finished:
        llm.engine.step()
        if first is None and seq.output_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"prefill_s": first - start, "decode_s": end - first, "tokens": seq.output_ids}


def run_llama_cpp(model: str, ids: list[int]) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    n_ctx = max(2048, len(ids) + DECODE_TOKENS + 64)
    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    load = time.perf_counter() - start
    tokens = []
    start = time.perf_counter()
    first = None
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(token))
        if len(tokens) == DECODE_TOKENS:
            break
    end = time.perf_counter()
    return {"load_s": load, "prefill_s": first - start, "decode_s": end - first, "tokens": tokens}


def run_transformers(model: str, ids: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    path = Path(model)
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return {"load_s": time.perf_counter() - start, **transformers_greedy(hf, ids)}


def transformers_greedy(hf, ids: list[int]) -> dict:
    """Prefill and DECODE_TOKENS greedy tokens with transformers' own KV cache: times and tokens."""
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        out = hf(torch.tensor([ids]), use_cache=True)
        first = time.perf_counter()
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        tokens = [int(token)]
        for _ in range(DECODE_TOKENS - 1):
            out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(token))
        end = time.perf_counter()
    return {"prefill_s": first - start, "decode_s": end - first, "tokens": tokens}


def parallel_qwen_engine(model: str, prompts: list[list[int]], quantization: str | None = None) -> dict:
    from qwen_engine import LLM, SamplingParams

    llm = LLM(model, progress=False, max_num_seqs=max(32, len(prompts)), quantization=quantization)
    params = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0, ignore_eos=True).with_defaults(SamplingParams())
    seqs = [llm.engine.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    while not all(s.output_ids for s in seqs):
        llm.engine.step()
    first = time.perf_counter()
    generated = sum(len(s.output_ids) for s in seqs)
    while llm.engine.has_work():
        llm.engine.step()
    end = time.perf_counter()
    total = sum(len(s.output_ids) for s in seqs)
    return {"prefill_s": first - start, "decode_s": end - first, "decode_tokens": total - generated,
            "tokens": [s.output_ids for s in seqs]}


def parallel_llama_cpp(model: str, prompts: list[list[int]]) -> dict:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    lm = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    n = len(prompts)
    cp.n_ctx = n * (max(map(len, prompts)) + STREAM_TOKENS + 16)
    cp.n_batch = cp.n_ubatch = 512
    cp.n_seq_max = n
    cp.n_threads = cp.n_threads_batch = THREADS
    ctx = L.llama_init_from_model(lm, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(lm))
    batch = L.llama_batch_init(512, 0, n)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        for k, (token, pos, seq, logits) in enumerate(entries):
            batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
            batch.seq_id[k][0] = seq
        batch.n_tokens = len(entries)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(row: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(vocab,)).argmax())

    start = time.perf_counter()
    out: list[list[int]] = []
    for seq, prompt in enumerate(prompts):  # prompts one by one, in chunks of the batch size
        for c in range(0, len(prompt), 512):
            chunk = prompt[c : c + 512]
            decode([(t, c + i, seq, c + i == len(prompt) - 1) for i, t in enumerate(chunk)])
        out.append([greedy(len(chunk) - 1)])
    first = time.perf_counter()
    for step in range(STREAM_TOKENS - 1):  # every stream's next token in one batch
        decode([(out[s][-1], len(prompts[s]) + step, s, True) for s in range(n)])
        for s in range(n):
            out[s].append(greedy(s))
    end = time.perf_counter()
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(lm)
    return {"prefill_s": first - start, "decode_s": end - first, "decode_tokens": n * (STREAM_TOKENS - 1),
            "tokens": out}


def quality(model: str, corpus: list[list[int]], peer_logits: str | None = None) -> dict[str, dict]:
    """How far the lossy w8a8 and a8 modes move the model: the KL divergence of their next-token distributions
    from the float model's (the default path's numbers), and how often their greedy choices agree, at every position;
    the same for the float model with its KV cache in float16 (kv_cache_dtype).
    With `peer_logits` (a folder of `quality_llama_cpp`'s files), the same for llama.cpp's own logits, whose
    products round activations to 8 bits too (its Q8_K / Q8_0 blocks): the distance of the peer from the model."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from qwen_engine import LLM

    exact, lossy = LLM(model, progress=False), LLM(model, progress=False, quantization="w8a8")
    activations = LLM(model, progress=False, quantization="a8")
    half_kv = LLM(model, progress=False, kv_cache_dtype="float16")
    systems = {"w8a8": lambda i, ids: lossy.logits(ids), "a8": lambda i, ids: activations.logits(ids),
               "float16 KV cache": lambda i, ids: half_kv.logits(ids)}
    if peer_logits:
        systems["llama.cpp"] = lambda i, ids: torch.from_numpy(np.load(Path(peer_logits) / f"{i}.npy"))
    kls: dict[str, list] = {name: [] for name in systems}
    agree = dict.fromkeys(systems, 0)
    for i, ids in enumerate(corpus):
        p = F.log_softmax(exact.logits(ids).float(), -1)
        for name, logits in systems.items():
            q = F.log_softmax(logits(i, ids).float(), -1)
            kls[name].append((p.exp() * (p - q)).sum(-1))
            agree[name] += int((p.argmax(-1) == q.argmax(-1)).sum())
    out = {}
    for name in systems:
        kl = torch.cat(kls[name])
        out[name] = {"mean_kl": float(kl.mean()), "p99_kl": float(kl.quantile(0.99)), "max_kl": float(kl.max()),
                     "greedy_agreement": agree[name] / kl.numel(), "positions": kl.numel()}
    return out


def quality_llama_cpp(model: str, corpus: list[list[int]], out_dir: str) -> dict:
    """llama.cpp's logits at every position of each corpus window, saved as `<window>.npy` in out_dir (the
    peer's environment has numpy; the float model's logits are computed in qwen-engine's child)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=max(len(ids) for ids in corpus), n_threads=THREADS,
                n_threads_batch=THREADS, n_batch=512, logits_all=True, verbose=False)
    for i, ids in enumerate(corpus):
        llm.reset()
        llm.eval(ids)
        np.save(Path(out_dir) / f"{i}.npy", np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    return {"windows": len(corpus)}


def first_load(model: str, mode: str) -> dict:
    """The first load in the w8a8 or a8 mode converts the model and keeps its int8 layers on disk; later loads map
    them."""
    from qwen_engine import LLM
    from qwen_engine.models import a8, w8a8
    from qwen_engine.models.calibration import calibration_ids
    from qwen_engine.text.tokenizer import QwenTokenizer
    from qwen_engine.weights import w8a8_store
    from qwen_engine.weights.gguf import GGUFFile

    if mode == "a8":
        store = a8.store_path(Path(model))
    else:
        tokenizer = QwenTokenizer.from_gguf_metadata(GGUFFile(model).metadata)
        store = w8a8_store.store_path(Path(model), w8a8.store_kind(calibration_ids(tokenizer)))
    kept = store is not None and store.exists()
    start = time.perf_counter()
    LLM(model, progress=False, quantization=mode)
    return {"load_s": time.perf_counter() - start, "converted": not kept}


RUNNERS = {"qwen-engine": run_qwen_engine, "llama.cpp": run_llama_cpp, "transformers": run_transformers,
           "qwen-engine-w8a8": lambda model, ids: run_qwen_engine(model, ids, "w8a8"),
           "qwen-engine-a8": lambda model, ids: run_qwen_engine(model, ids, "a8")}
PARALLEL = {"qwen-engine": parallel_qwen_engine, "llama.cpp": parallel_llama_cpp,
            "qwen-engine-w8a8": lambda model, prompts: parallel_qwen_engine(model, prompts, "w8a8"),
            "qwen-engine-a8": lambda model, prompts: parallel_qwen_engine(model, prompts, "a8")}


def quality_corpus(tok, windows: int = 4, length: int = 512) -> list[list[int]]:
    """A fixed corpus: the first `length` tokens of a few standard-library modules (code and prose docstrings;
    the demo model is a code model), the same for every run on one Python version."""
    import heapq
    import inspect
    import json.decoder
    import textwrap

    modules = [textwrap, json.decoder, heapq, argparse][:windows]
    return [tok.encode(inspect.getsource(m))[:length] for m in modules]


def child(system: str, model: str, ids_file: str) -> None:
    ids = json.loads(Path(ids_file).read_text())
    if system.endswith("@parallel"):  # ids: one prompt per stream
        result = PARALLEL[system.removesuffix("@parallel")](model, ids)
    elif system == "quality":  # ids: the corpus windows and where llama.cpp's logits are, if measured
        result = quality(model, ids["corpus"], ids["peer_logits"])
    elif system == "quality-llama.cpp":
        result = quality_llama_cpp(model, ids["corpus"], ids["out_dir"])
    elif system.endswith("-store"):
        result = first_load(model, system.removesuffix("-store"))
    else:
        result = RUNNERS[system](model, ids)
        result["prompt_tokens"] = len(ids)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


# -- the driver ------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the demo model)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", default="qwen-engine,llama.cpp,transformers")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--context", type=int, default=0,
                   help="make the single-stream prompt at least this many tokens (more copies of its module)")
    p.add_argument("--streams", default="", help="also measure N concurrent streams, e.g. 8,16,32")
    p.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the single-stream table (--no-single: only the streams)")
    p.add_argument("--quality", action="store_true",
                   help="also measure the w8a8 and a8 modes' KL divergence and greedy agreement on a fixed corpus")
    p.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"),
                   help="the Python of the environment made by setup_peers.sh")
    p.add_argument("--child", nargs=3, metavar=("SYSTEM", "MODEL", "IDS_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    from qwen_engine.text.template import ChatTemplate
    from qwen_engine.text.tokenizer import QwenTokenizer
    from qwen_engine.weights.demo import demo_model_path
    from qwen_engine.weights.gguf import GGUFFile

    model = args.model or str(demo_model_path())
    meta = GGUFFile(model).metadata
    tok = QwenTokenizer.from_gguf_metadata(meta)
    template = ChatTemplate(meta.get("tokenizer.chat_template"), tok.special_tokens_map())
    copies = 3
    ids = tok.encode(template.render(prompt_messages(copies)))
    while len(ids) < args.context:
        copies += 1
        ids = tok.encode(template.render(prompt_messages(copies)))
    # The children import qwen_engine from this checkout, whatever is installed in the environment.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), QWEN_ENGINE_BENCH_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT))
    systems = args.systems.split(",")

    def run_child(system: str, payload) -> dict | None:
        ids_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen-engine-bench-{os.getpid()}.json"
        ids_file.write_text(json.dumps(payload))
        ours = system.startswith("qwen-engine") or system.endswith("-store") or system == "quality"
        python = sys.executable if ours else args.peer_python
        proc = subprocess.run([python, __file__, "--child", system, model, str(ids_file)], capture_output=True,
                              text=True, env=env)
        ids_file.unlink(missing_ok=True)
        if proc.returncode != 0:
            print(f"{system} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    global THREADS
    THREADS = args.threads
    for mode in ("w8a8", "a8"):
        if f"qwen-engine-{mode}" not in systems:
            continue
        # The runs time loads after the first one, which converts the model and keeps its int8 layers on disk
        # (weights/w8a8_store.py) — as the load target counts loads after the demo model's assembly.
        r = run_child(f"{mode}-store", [])
        if r is not None:
            what = "first load (conversion, layers kept)" if r["converted"] else "load (layers already kept)"
            print(f"{mode}: {what} {r['load_s']:.1f} s, rss {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    if args.single:
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for run in range(args.runs):
            for system in systems:
                r = run_child(system, ids)
                if r is None:
                    continue
                results[system].append(r)
                print(f"run {run + 1} {system}: prefill {len(ids) / r['prefill_s']:.1f} tok/s, decode "
                      f"{(DECODE_TOKENS - 1) / r['decode_s']:.1f} tok/s, rss {r['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
        report(results, len(ids))

    levels = [int(n) for n in args.streams.split(",") if n]
    if levels:
        parallel_systems = [s for s in systems if s in PARALLEL]
        streams: dict[int, dict[str, list[dict]]] = {n: {s: [] for s in parallel_systems} for n in levels}
        for run in range(args.runs):
            for n in levels:
                prompts = [tok.encode(template.render(stream_messages(i))) for i in range(n)]
                for system in parallel_systems:
                    r = run_child(f"{system}@parallel", prompts)
                    if r is None:
                        continue
                    streams[n][system].append(r)
                    print(f"run {run + 1} {n} streams {system}: {r['decode_tokens'] / r['decode_s']:.1f} tok/s",
                          file=sys.stderr)
        report_streams(streams)

    if args.quality:
        corpus = quality_corpus(tok)
        with tempfile.TemporaryDirectory() as peer_dir:
            # llama.cpp's logits too when it is among the systems: the peer's own distance from the model.
            peer = "llama.cpp" in systems and run_child("quality-llama.cpp", {"corpus": corpus, "out_dir": peer_dir})
            r = run_child("quality", {"corpus": corpus, "peer_logits": peer_dir if peer else None})
        if r is not None:
            print(f"\nAgainst the float model (qwen-engine's default path) over {r['w8a8']['positions']} positions "
                  f"({len(corpus)} standard-library modules, {len(corpus[0])} tokens each):")
            for name, q in r.items():
                if not isinstance(q, dict):  # the child's peak RSS
                    continue
                print(f"  {name}: mean KL {q['mean_kl']:.3g} nats, 99th percentile {q['p99_kl']:.3g}, max "
                      f"{q['max_kl']:.3g}; greedy agreement {100 * q['greedy_agreement']:.2f} %")


def report(results: dict[str, list[dict]], prompt_tokens: int) -> None:
    rows = {}
    for system, runs in results.items():
        if runs:
            rows[system] = {
                "load": statistics.median(r["load_s"] for r in runs),
                "prefill": statistics.median(prompt_tokens / r["prefill_s"] for r in runs),
                "decode": statistics.median((DECODE_TOKENS - 1) / r["decode_s"] for r in runs),
                "rss": statistics.median(r["peak_rss_mib"] for r in runs),
                "tokens": runs[0]["tokens"],
            }
    base = rows.get("llama.cpp")
    print(f"prompt: {prompt_tokens} tokens; decode: {DECODE_TOKENS} greedy tokens; {THREADS} threads; medians of "
          f"{max(len(r) for r in results.values())} runs")
    # transformers on the dequantised model is the float32 reference the default mode must match token for token.
    reference = rows.get("transformers")
    print("| system | load s | prefill tok/s | decode tok/s | peak RSS MiB | prefill × llama.cpp | decode × llama.cpp |"
          " same tokens as llama.cpp |" + (" same tokens as transformers |" if reference else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if reference else ""))
    for system, r in rows.items():
        print(f"| {system} | {r['load']:.1f} | {r['prefill']:.1f} | {r['decode']:.1f} | {r['rss']:.0f} | "
              f"{_ratio(r, base, 'prefill')} | {_ratio(r, base, 'decode')} | {_same_tokens(r, base)} |"
              + (f" {_same_tokens(r, reference)} |" if reference else ""))


def report_streams(streams: dict[int, dict[str, list[dict]]]) -> None:
    print(f"\nconcurrent streams: different ~40-token prompts, {STREAM_TOKENS} greedy tokens each; decode-phase "
          f"throughput (all streams' tokens / time after every stream has its first token), medians")
    print("| streams | system | decode tok/s (all streams) | peak RSS MiB | × llama.cpp | same tokens as llama.cpp |")
    print("|---|---|---|---|---|---|")
    for n, by_system in streams.items():
        rows = {s: {"tput": statistics.median(r["decode_tokens"] / r["decode_s"] for r in runs),
                    "rss": statistics.median(r["peak_rss_mib"] for r in runs), "tokens": runs[0]["tokens"]}
                for s, runs in by_system.items() if runs}
        base = rows.get("llama.cpp")
        for system, r in rows.items():
            same = "–"
            if base:
                agree = sum(a == b for a, b in zip(r["tokens"], base["tokens"], strict=False))
                same = f"{agree}/{len(r['tokens'])} streams"
            ratio = f"{r['tput'] / base['tput']:.2f}×" if base else "–"
            print(f"| {n} | {system} | {r['tput']:.1f} | {r['rss']:.0f} | {ratio} | {same} |")


def _ratio(row: dict, base: dict | None, key: str) -> str:
    return f"{row[key] / base[key]:.2f}×" if base else "–"


def _same_tokens(row: dict, base: dict | None) -> str:
    if not base:
        return "–"
    if row["tokens"] == base["tokens"]:
        return "yes"
    first = next(i for i, (a, b) in enumerate(zip(row["tokens"], base["tokens"], strict=False)) if a != b)
    return f"differs from token {first}"


if __name__ == "__main__":
    main()

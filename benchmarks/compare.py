"""qwen-engine against llama.cpp and transformers on the same GGUF, prompt and thread count.

    bash benchmarks/setup_peers.sh                      # once: the peers, in .bench-venv (not project dependencies)
    python benchmarks/compare.py --runs 3               # the table of medians and ratios

Every measurement runs in a fresh subprocess (so peak RSS is the system's own), the systems alternate run by
run, and all of them get the same token ids: a ~516-token chat prompt rendered with the model's template. For
each run: load time, prefill tokens/s (time to the first generated token), single-stream decode tokens/s over
128 greedy tokens, peak RSS. The greedy tokens are compared across systems. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECODE_TOKENS = 128

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


def prompt_messages() -> list[dict]:
    question = (
        "Review the following Python module. Point out bugs, edge cases that are not handled, and performance "
        "problems, then propose an improved version with type hints and docstrings.\n```python\n"
        + CODE * 3 + "```"
    )
    return [{"role": "system", "content": "You are a careful senior Python reviewer."},
            {"role": "user", "content": question}]


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one system, in its own process ----------------------------------------------------------------------------

def run_qwen_engine(model: str, ids: list[int]) -> dict:
    from qwen_engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, progress=False)
    load = time.perf_counter() - start
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True).with_defaults(SamplingParams())
    seq = llm.engine.add_request(ids, params)
    start = time.perf_counter()
    first = None
    while not seq.finished:
        llm.engine.step()
        if first is None and seq.output_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"load_s": load, "prefill_s": first - start, "decode_s": end - first, "tokens": seq.output_ids}


def run_llama_cpp(model: str, ids: list[int]) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)
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

    torch.set_num_threads(2)
    path = Path(model)
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf(input_ids, use_cache=True)
        first = time.perf_counter()
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        tokens = [int(token)]
        for _ in range(DECODE_TOKENS - 1):
            out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(token))
        end = time.perf_counter()
    return {"load_s": load, "prefill_s": first - start, "decode_s": end - first, "tokens": tokens}


RUNNERS = {"qwen-engine": run_qwen_engine, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def child(system: str, model: str, ids_file: str) -> None:
    ids = json.loads(Path(ids_file).read_text())
    result = RUNNERS[system](model, ids)
    result["peak_rss_mib"] = peak_rss_mib()
    result["prompt_tokens"] = len(ids)
    print(json.dumps(result))


# -- the driver ------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the demo model)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", default="qwen-engine,llama.cpp,transformers")
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
    text = ChatTemplate(meta.get("tokenizer.chat_template"), tok.special_tokens_map()).render(prompt_messages())
    ids = tok.encode(text)
    ids_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen-engine-bench-{os.getpid()}.json"
    ids_file.write_text(json.dumps(ids))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for run in range(args.runs):
        for system in systems:
            python = sys.executable if system == "qwen-engine" else args.peer_python
            proc = subprocess.run([python, __file__, "--child", system, model, str(ids_file)], capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                print(f"{system} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[system].append(r)
            print(f"run {run + 1} {system}: prefill {len(ids) / r['prefill_s']:.1f} tok/s, decode "
                  f"{(DECODE_TOKENS - 1) / r['decode_s']:.1f} tok/s, rss {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    ids_file.unlink(missing_ok=True)
    report(results, len(ids))


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
    print(f"prompt: {prompt_tokens} tokens; decode: {DECODE_TOKENS} greedy tokens; 2 threads; medians of "
          f"{max(len(r) for r in results.values())} runs")
    print("| system | load s | prefill tok/s | decode tok/s | peak RSS MiB | prefill × llama.cpp | decode × llama.cpp |"
          " same tokens as llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for system, r in rows.items():
        print(f"| {system} | {r['load']:.1f} | {r['prefill']:.1f} | {r['decode']:.1f} | {r['rss']:.0f} | "
              f"{_ratio(r, base, 'prefill')} | {_ratio(r, base, 'decode')} | {_same_tokens(r, base)} |")


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

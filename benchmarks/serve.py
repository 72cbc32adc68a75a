"""Throughput and latency of `qwen-engine serve` at several concurrency levels, side by side with llama.cpp's
server on the same GGUF.

    python benchmarks/serve.py                      # qwen-engine with the demo model
    python benchmarks/serve.py --systems qwen-engine,qwen-engine-a8,llama.cpp --llama-server .bench-venv/bin/llama-server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME      # a server already running

For each system and concurrency level, a server is started on a free port with the same model, threads, KV
capacity in tokens and as many parallel sequences as there are clients; one short request warms it up; then that
many clients each send streamed greedy chat requests back to back, each on a new connection. Printed per level: requests/s, generated tokens/s, time to
first token and inter-token latency (p50 / p99), the server's peak resident memory, and generated tokens/s as a
ratio of llama.cpp's at that level. `llama-server` is what ollama runs; `benchmarks/setup_peers.sh` builds it
from the same llama.cpp release as the llama-cpp-python of `compare.py`. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a hash map is in three sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts orders per customer.",
    "Give me three tips for writing readable code.",
    "What does the `yield` keyword do?",
    "Explain recursion to a beginner.",
    "Write a bash one-liner that counts lines in all .py files.",
]


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, stamps, tokens, text = None, [], 0, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600,
                             headers={"Connection": "close"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
                text.append(chunk["choices"][0]["delta"]["content"])
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": (first or time.perf_counter()) - start, "gaps": gaps, "tokens": tokens or len(stamps),
            "question": question, "text": "".join(text)}


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            results.append(await one_request(client, url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens))

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "concurrency": concurrency, "requests": len(results), "seconds": elapsed,
        "req_per_s": len(results) / elapsed, "tok_per_s": sum(r["tokens"] for r in results) / elapsed,
        "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99),
        "answers": {r["question"]: r["text"] for r in results},
    }


def kv_bytes_per_token(gguf_path: str) -> int:
    """qwen-engine's float32 keys and values of one token: 4 bytes × 2 × layers × KV heads × head size (the demo
    model: 24 KiB). Every layer counted: for a hybrid (Qwen3.5) this gives qwen-engine more tokens than llama.cpp."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def value(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    heads = value(f"{arch}.attention.head_count")
    head_size = (value(f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in reader.fields
                 else value(f"{arch}.embedding_length") // heads)
    return 4 * 2 * value(f"{arch}.block_count") * value(f"{arch}.attention.head_count_kv") * head_size


def peak_rss_mib(pid: int) -> float:
    """The server process's high-water mark of resident memory (VmHWM: its own, not its children's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class LlamaServer:
    """llama.cpp's `llama-server` on a free port: continuous batching over `parallel` slots sharing one KV cache."""

    def __init__(self, binary: str, model: str, threads: int, parallel: int, context_tokens: int):
        from server_process import free_port, wait_until_healthy

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                   "-tb", str(threads), "-np", str(parallel), "-c", str(context_tokens), "--kv-unified",
                   "--jinja", "--no-webui", "--log-disable"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until_healthy(self.proc, self.base_url, timeout=300)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start(system: str, args: argparse.Namespace, parallel: int):
    if system == "llama.cpp":
        return LlamaServer(args.llama_server, args.gguf, args.threads, parallel, args.kv_tokens)
    from server_process import ServerProcess

    extra = ["--quantization", system.removeprefix("qwen-engine-")] if system != "qwen-engine" else []
    # qwen-engine takes its thread count from the cores it may use, as it would for a user
    model = ["--model", args.gguf] if args.gguf_given else []
    return ServerProcess(*model, "--kv-cache-memory", args.kv_memory, "--max-num-seqs", str(parallel), *extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="measure a server already running instead of starting the systems")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model name sent in requests")
    p.add_argument("--gguf", help="GGUF file for every system (default: the demo model)")
    p.add_argument("--systems", default="qwen-engine",
                   help="comma-separated: qwen-engine, qwen-engine-a8, qwen-engine-w8a8, llama.cpp")
    p.add_argument("--llama-server", default=str(ROOT / ".bench-venv" / "bin" / "llama-server"),
                   help="llama.cpp's server binary (setup_peers.sh builds it into the benchmark environment)")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="llama-server's threads (qwen-engine uses the cores)")
    p.add_argument("--kv-tokens", type=int, default=32768, help="KV capacity in tokens for every system")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.url:
        targets = [("server", None)]
    else:
        from qwen_engine.weights.demo import demo_model_path

        args.gguf_given = args.gguf is not None
        args.gguf = args.gguf or str(demo_model_path())
        args.kv_memory = f"{args.kv_tokens * kv_bytes_per_token(args.gguf) // 1024 ** 2}MiB"
        targets = [(s, s) for s in args.systems.split(",")]
        if "llama.cpp" in args.systems and not os.access(args.llama_server, os.X_OK):
            sys.exit(f"error: no llama-server at {args.llama_server} (run benchmarks/setup_peers.sh, or pass "
                     "--llama-server)")
    results: dict[str, list[dict]] = {name: [] for name, _ in targets}
    for c in levels:  # systems alternate level by level, so that a slow spell of the machine hits them alike
        for name, system in targets:
            # a server per level, with as many parallel sequences as clients: each system at its best setting
            server = start(system, args, c) if system else None
            url = server.base_url if server else args.url
            try:
                asyncio.run(one_request_client(url, args.model))  # warm-up: first-call costs out of the figures
                row = asyncio.run(level(url, args.model, c, c * args.requests_per_client, args.max_tokens))
                row["rss"] = peak_rss_mib(server.proc.pid) if server else float("nan")
            finally:
                if server:
                    server.stop()
            results[name].append(row)
            print(f"{name}, {c} clients: {row['tok_per_s']:.1f} tok/s", file=sys.stderr)
    report(results, levels)


async def one_request_client(url: str, model: str) -> None:
    async with httpx.AsyncClient() as client:
        await one_request(client, url, model, "Say hello.", 8)


def report(results: dict[str, list[dict]], levels: list[int]) -> None:
    base = results.get("llama.cpp")
    print("| system | clients | requests | req/s | generated tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
          "peak RSS MiB | tok/s × llama.cpp | answers as llama.cpp's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(levels):
        for name, rows in results.items():
            r = rows[i]
            ratio = f"{r['tok_per_s'] / base[i]['tok_per_s']:.2f}×" if base else "—"
            same = "—"
            if base and name != "llama.cpp":
                theirs = base[i]["answers"]
                shared = [q for q in r["answers"] if q in theirs]
                same = f"{sum(r['answers'][q] == theirs[q] for q in shared)}/{len(shared)}"
            print(f"| {name} | {c} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
                  f"{r['ttft_p50']:.2f} s | {r['ttft_p99']:.2f} s | {r['itl_p50'] * 1000:.0f} ms | "
                  f"{r['itl_p99'] * 1000:.0f} ms | {r['rss']:.0f} | {ratio} | {same} |")


if __name__ == "__main__":
    main()

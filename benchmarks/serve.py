"""Throughput and latency of `qwen-engine serve` at several concurrency levels.

    python benchmarks/serve.py                      # starts a server with the demo model on a free port
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME

For each concurrency level, that many clients each send streamed chat requests back to back for a fixed number
of requests; the script prints requests/s, generated tokens/s, time to first token and inter-token latency
(p50 / p99). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

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
    first, stamps, tokens = None, [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": (first or time.perf_counter()) - start, "gaps": gaps, "tokens": tokens}


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            results.append(await one_request(client, url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient() as client:
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
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one with the demo model)")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    server = None
    if args.url is None:
        from server_process import ServerProcess

        server = ServerProcess("--kv-cache-memory", "2GiB", "--max-num-seqs", "32")
        args.url = server.base_url
    try:
        rows = []
        for c in (int(x) for x in args.levels.split(",")):
            rows.append(asyncio.run(level(args.url, args.model, c, c * args.requests_per_client, args.max_tokens)))
            r = rows[-1]
            print(f"concurrency {c}: {r['tok_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        if server:
            server.stop()
    print("| clients | requests | req/s | generated tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} s | {r['ttft_p99']:.2f} s | {r['itl_p50'] * 1000:.0f} ms | "
              f"{r['itl_p99'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()

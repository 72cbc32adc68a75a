"""A chat's next turn with the prefix cache on and off: time to its first token, and how much of the conversation
so far came from the cache (for hybrid models such as Qwen3.5, resumed from a saved recurrent state).

    python benchmarks/prefix_cache.py                                # the demo model
    python benchmarks/synthetic_qwen3_5.py /tmp/qwen3_5-synthetic
    python benchmarks/prefix_cache.py --model /tmp/qwen3_5-synthetic  # a hybrid model

Each run asks a different follow-up question after the same first turn (a long user message and the model's
greedy answer), so no run is served from another run's follow-up. Medians of --runs; one process, the two
settings in alternation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the engine keeps keys and values of every layer in blocks of sixteen tokens and names each full block "
         "by a hash of its tokens so that a later request with the same beginning finds them again").split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file or model folder (default: the demo model)")
    p.add_argument("--history-words", type=int, default=700, help="words in the first user message")
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    from qwen_engine import LLM, SamplingParams

    first = " ".join(WORDS[i % len(WORDS)] for i in range(args.history_words))
    greedy = SamplingParams(temperature=0, max_tokens=args.answer_tokens, repetition_penalty=1.0)
    one = SamplingParams(temperature=0, max_tokens=1, repetition_penalty=1.0)
    rows = []
    for caching in (True, False):
        llm = LLM(args.model, enable_prefix_caching=caching, progress=False)
        history = [{"role": "user", "content": f"Summarise this: {first}"}]
        answer = llm.chat(history, greedy)
        history.append({"role": "assistant", "content": answer.text})
        times, cached, prompt_tokens = [], [], 0
        for run in range(args.runs):
            turn = [*history, {"role": "user", "content": f"Question {run + 1}: which word came {run + 2}th?"}]
            hits = llm.engine.blocks.hits
            start = time.perf_counter()
            out = llm.chat(turn, one)
            times.append(time.perf_counter() - start)
            cached.append(llm.engine.blocks.hits - hits)
            prompt_tokens = out.usage.prompt_tokens
        rows.append((caching, prompt_tokens, statistics.median(cached), statistics.median(times)))
        del llm

    print(f"model: {args.model or 'the demo model'}; first turn {args.history_words} words + "
          f"{args.answer_tokens}-token answer; medians of {args.runs} runs\n")
    print("| prefix cache | next turn's prompt tokens | from the cache | time to first token |")
    print("|---|---|---|---|")
    for caching, tokens, cached, seconds in rows:
        print(f"| {'on' if caching else 'off'} | {tokens} | {cached:.0f} | {seconds * 1000:.0f} ms |")
    print(f"\nspeed-up of the next turn's first token: {rows[1][3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    main()

"""Threads beside the one that runs the model (qwen_engine/threads.py): work runs, results and errors come back, no
thread outlives its work, and — the reason for it all — a thread that ends takes its OpenMP workers with it."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qwen_engine.threads import PassingThreads, on_a_passing_thread, prepare


def _wait_for_threads(count: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def test_on_a_passing_thread_returns_raises_and_ends():
    before = threading.active_count()
    names = []
    assert on_a_passing_thread(lambda: names.append(threading.current_thread().name) or 42) == 42
    assert names == ["qwen-engine-load"]  # not the caller's thread

    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        on_a_passing_thread(fail)
    assert _wait_for_threads(before) == before


def test_passing_threads_bound_their_number_and_end_when_idle():
    before = threading.active_count()
    pool = PassingThreads(max_workers=3)
    running, peak, lock = 0, 0, threading.Lock()
    gate = threading.Event()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(10)
        with lock:
            running -= 1
        return i * i

    futures = [pool.submit(work, i) for i in range(10)]
    time.sleep(0.2)
    assert threading.active_count() == before + 3  # ten jobs queued, three threads
    gate.set()
    assert [f.result(timeout=10) for f in futures] == [i * i for i in range(10)]
    assert peak == 3
    assert _wait_for_threads(before) == before  # nobody left once the queue is empty
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=10)
    assert pool.submit(lambda: "again").result(timeout=10) == "again"  # new threads when work comes back


def test_prepare_is_to_thread_on_passing_threads():
    request_id = contextvars.ContextVar("request_id", default=None)

    def where(x: int) -> tuple[int, str | None, str]:
        return x + 1, request_id.get(), threading.current_thread().name

    async def main():
        request_id.set("abc")
        return await prepare(where, 1)

    assert asyncio.run(main()) == (2, "abc", "qwen-engine-prepare")  # context variables travel, as with to_thread


SCRIPT = textwrap.dedent("""
    import os, sys, threading, time, torch
    from qwen_engine.threads import on_a_passing_thread
    torch.set_num_threads(2)

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def parallel_work() -> None:
        x = torch.randn(512, 512)
        for _ in range(5):
            (x @ x).add_(1).sum()

    def settled() -> int:
        time.sleep(0.5)  # a pool's workers leave shortly after their thread
        return threads()

    base = settled()
    on_a_passing_thread(parallel_work)
    after_passing = settled()
    parallel_work()  # the same work on this thread, which stays
    after_main = settled()
    print(base, after_passing, after_main)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="counts a process's threads in /proc; needs two cores for an OpenMP worker")
def test_a_passing_thread_takes_its_openmp_workers_along():
    """What the design rests on (PyTorch's OpenMP keeps workers per thread that ran a parallel loop, and frees
    them with that thread): parallel work on a passing thread leaves no thread behind, on a staying one it does.
    If a PyTorch release changes this, this test says so, and qwen_engine/threads.py needs another look."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    base, after_passing, after_main = (int(x) for x in out.stdout.split())
    assert after_passing == base
    assert after_main == base + 1  # the control: this thread's pool keeps its one worker


LOAD_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from qwen_engine import LLM

    def settled() -> int:
        time.sleep(0.5)
        return len(os.listdir("/proc/self/task"))

    base = settled()
    llm = LLM(sys.argv[1])  # the demo model: its load runs parallel loops (on the caller's thread they left a worker)
    print(base, settled())
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="counts a process's threads in /proc; needs two cores for an OpenMP worker")
def test_llm_leaves_no_openmp_workers_behind(demo_gguf):
    """LLM() loads on a passing thread: the process holds no OpenMP pool afterwards, so whichever thread runs
    the model (the caller's, the server's engine thread) holds the only one. (The demo model is assembled before:
    the assembly's progress bar leaves a thread of its own.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(demo_gguf)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    base, after = (int(x) for x in out.stdout.split())
    assert after == base

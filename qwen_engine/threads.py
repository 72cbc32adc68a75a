"""Threads beside the one that runs the model, kept from slowing it down.

PyTorch's OpenMP (libgomp) keeps a pool of worker threads for each thread that has run a parallel loop, and once
the process holds more pool workers than it has cores, idle workers stop spinning between loops and sleep:
every parallel loop then waits for a wake-up. A decode step of the demo model runs 98 of them (counted), so a
model loaded on one thread (a pool) and run on another (a second) decoded ~25 % slower than on the thread that
loaded it (22 against 17.5 ms a token on 2 cores): the server's case, whose engine steps on its own thread, and
that of any application calling the model from a worker thread. A pool goes away with its thread, so `LLM`
loads on a thread that ends, and the server prepares requests (templates, images, videos, which may run PyTorch
loops) on threads that end once no work is queued: the thread that runs the model holds the only pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


def on_a_passing_thread(fn: Callable[[], T], name: str = "qwen-engine-load") -> T:
    """fn() on a new thread that ends when fn returns; its result, or its exception raised again here."""
    future: Future = Future()
    thread = threading.Thread(target=_run, args=(future, fn, (), {}), name=name, daemon=True)
    thread.start()
    thread.join()
    return future.result()


class PassingThreads(Executor):
    """An executor whose threads (at most `max_workers`) end as soon as the queue is empty."""

    def __init__(self, max_workers: int = 4, name: str = "qwen-engine-prepare"):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads, self._max_workers, self._name = 0, max_workers, name

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future = Future()
        self._work.put((future, fn, args, kwargs))
        with self._lock:  # a drainer that found the queue empty has left under this lock: start one if needed
            if self._threads < self._max_workers:
                self._threads += 1
                threading.Thread(target=self._drain, name=self._name, daemon=True).start()
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    self._threads -= 1
                    return
            _run(*item)


def _run(future: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 — handed to whoever waits on the future
        future.set_exception(e)


_PREPARE = PassingThreads()


async def prepare(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """asyncio.to_thread, on threads that end when idle (asyncio's default executor must be a thread pool)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, call)

"""The engine on its own thread, fed and drained by asyncio request handlers.

The model steps on one background thread (PyTorch releases the GIL inside its kernels, so the event loop stays
responsive); handlers submit requests through a queue and receive updates on an asyncio.Queue each. Requests
join the running batch at the next step. A cancelled handler aborts its sequence, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine.engine import Engine, Guide
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import Sequence
from ..errors import QwenEngineError
from ..vision.prompt import Prompt

log = logging.getLogger("qwen_engine.server")


class QueueFullError(QwenEngineError):
    """Too many requests are waiting; the client should retry later."""


class EngineDeadError(QwenEngineError):
    """The engine failed while running this request."""


@dataclass
class Update:
    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


class RequestStream:
    """One request's updates, as the engine thread produces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
                 guide: Guide | None, vision: Prompt | None = None):
        self.loop = loop
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.prompt_ids, self.params, self.guide, self.vision = prompt_ids, params, guide, vision
        self.seq: Sequence | None = None
        self.created = time.monotonic()
        self.done = False

    def push(self, update: Update) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, update)

    async def __aiter__(self) -> AsyncIterator[Update]:
        while not self.done:
            update = await self.queue.get()
            if update.error:
                self.done = True
                raise EngineDeadError(update.error)
            if update.finish_reason:
                self.done = True
            yield update


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, RequestStream] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qwen-engine-loop", daemon=True)
        self.in_flight = 0  # submitted and not finished, as seen from the handlers' side

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._commands.qsize()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, guide: Guide | None = None, vision: Prompt | None = None
    ) -> RequestStream:
        """Queue a request; raises at once for a prompt that can never run or when the queue is full."""
        self.engine.check_prompt(prompt_ids, params)
        if not self.alive:
            raise EngineDeadError("the engine is not running; restart the server")
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting (limit {self.max_waiting})")
        stream = RequestStream(asyncio.get_running_loop(), prompt_ids, params, guide, vision)
        self.in_flight += 1
        self._commands.put(("add", stream))
        self._wake.set()
        return stream

    async def prompt_logprobs(self, prompt_ids: list[int], top_n: int) -> list[tuple[float | None, list]]:
        """Each prompt token's log-prob (see Engine.prompt_logprobs), computed on the engine thread between
        steps: the model is not to be run from two threads at once."""
        self.engine.check_prompt(prompt_ids)
        if not self.alive:
            raise EngineDeadError("the engine is not running; restart the server")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put(("score", (loop, future, prompt_ids, top_n)))
        self._wake.set()
        return await future

    def abort(self, stream: RequestStream) -> None:
        if not stream.done:
            stream.done = True
            self._commands.put(("abort", stream))
            self._wake.set()

    def finished(self, stream: RequestStream) -> None:
        self.in_flight -= 1

    # -- the engine thread -----------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the engine thread has ended (shut down, or killed by a bug that escaped every guard)."""
        return self._thread.is_alive() and not self._stop

    def _run(self) -> None:
        while not self._stop:
            try:
                self._apply_commands()
            except Exception as e:  # as for a step: fail what is in flight, keep serving
                log.exception("applying requests failed")
                self._fail_all(f"internal engine error: {type(e).__name__}: {e}")
                continue
            if not self.engine.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                seqs = self.engine.step()
            except Exception as e:  # a bug must not take the server down: fail what was in flight, go on
                log.exception("engine step failed")
                self._fail_all(f"internal engine error: {type(e).__name__}: {e}")
                continue
            for seq in seqs:
                stream = self._streams.get(seq.seq_id)
                if stream is not None:
                    stream.push(_update(seq))
                    if seq.finished:
                        del self._streams[seq.seq_id]

    def _apply_commands(self) -> None:
        while True:
            try:
                command, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add" and not stream.done:
                try:
                    seq = self.engine.add_request(
                        stream.prompt_ids, stream.params, guide=stream.guide, vision=stream.vision
                    )
                except QwenEngineError as e:
                    stream.push(Update("", [], error=str(e)))
                    continue
                except Exception as e:  # a bug in one request's set-up must not end the loop for all
                    log.exception("adding a request failed")
                    stream.push(Update("", [], error=f"internal engine error: {type(e).__name__}: {e}"))
                    continue
                stream.seq = seq
                self._streams[seq.seq_id] = stream
            elif command == "score":
                self._score(*stream)
            elif command == "abort" and stream.seq is not None:
                self.engine.abort(stream.seq)
                self._streams.pop(stream.seq.seq_id, None)

    def _score(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, prompt_ids: list[int], top_n: int
               ) -> None:
        def settle(result=None, error: Exception | None = None) -> None:
            if not future.done():  # the handler may have gone (client disconnected)
                future.set_exception(error) if error else future.set_result(result)

        try:
            result = self.engine.prompt_logprobs(prompt_ids, top_n)
        except QwenEngineError as e:
            loop.call_soon_threadsafe(settle, None, e)
        except Exception as e:
            log.exception("scoring a prompt failed")
            loop.call_soon_threadsafe(settle, None, EngineDeadError(f"internal engine error: {type(e).__name__}: {e}"))
        else:
            loop.call_soon_threadsafe(settle, result)

    def _fail_all(self, message: str) -> None:
        for stream in list(self._streams.values()):
            if stream.seq is not None:
                self.engine.abort(stream.seq)
            stream.push(Update("", [], error=message))
        self._streams.clear()


def _update(seq: Sequence) -> Update:
    update = Update(
        text=seq.pending_text,
        token_ids=seq.pending_ids,
        logprobs=seq.pending_logprobs,
        finish_reason=seq.finish_reason if seq.finished else None,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.output_ids),
        cached_tokens=seq.num_cached_prompt,
    )
    seq.pending_text, seq.pending_ids, seq.pending_logprobs = "", [], []
    return update

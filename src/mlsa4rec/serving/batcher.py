"""Where the HTTP service's model calls run: one worker thread for all of them (``ModelWorker``), so the
event loop stays free and the model is never entered from two threads, and the micro-batcher
(``Batcher``) that merges concurrent single-history requests into one model call."""

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlsa4rec.serving.recommender import Recommendation, Recommender


class ModelWorker:
    """The model's one worker thread: made when the app starts (or by the first call before that),
    shut down when it stops; a call after that makes a new one."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlsa4rec-model")
        return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the model's one worker thread (in the caller's context: its messages' spelling)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.start(), call)

    def stop(self) -> None:
        """Shut the thread down without waiting for a model call still running on it."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


@dataclass
class _Pending:
    ids: list[int]
    k: int
    exclude_seen: bool
    exclude: list[Any]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Merges single-history requests into one ``Recommender.users`` call (at most ``max_batch``);
    each request is then ranked with its own k and exclusions.

    A batch takes every request queued while the model was busy with the previous one, and waits
    (at most ``window_s``) until as many have arrived as the previous batch held: under concurrent
    load the batches keep their size, while a lone request (the last batch was a single one)
    never waits, so batching costs no latency when there is nothing to merge.
    """

    def __init__(self, rec: Recommender, run: Callable[..., Any], window_s: float, max_batch: int,
                 sizes: Histogram) -> None:
        self.rec = rec
        self.run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self.sizes = sizes
        self.queue: asyncio.Queue[_Pending] | None = None
        self._full: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._target = 0  # queued requests the current batch waits for
        self._batch: list[_Pending] = []  # the batch being scored
        self._unanswered = 0  # submitted and not answered yet
        self._retiring = False

    @property
    def running(self) -> bool:
        """Whether it takes requests (not once ``retire`` began: callers then score on their own)."""
        return self._task is not None and not self._task.done() and not self._retiring

    async def retire(self, limit_s: float = 30.0) -> None:
        """Stop taking requests, answer every one already submitted (at most ``limit_s``), then stop:
        what a reload does to the batcher of the run it replaces, so no request sees it go."""
        self._retiring = True
        deadline = time.monotonic() + limit_s
        while self._unanswered and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await self.stop()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        waiting = list(self._batch)
        while self.queue is not None and not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(StarletteHTTPException(503, "the server is shutting down"))

    async def submit(self, ids: list[int], k: int, exclude_seen: bool, exclude: list[Any]) -> list[Recommendation]:
        assert self.queue is not None and self._full is not None
        future = asyncio.get_running_loop().create_future()
        self._unanswered += 1
        future.add_done_callback(self._answered)
        self.queue.put_nowait(_Pending(ids, k, exclude_seen, exclude, future))
        if self.queue.qsize() >= self._target:
            self._full.set()
        return await future

    def _answered(self, future: asyncio.Future) -> None:
        self._unanswered -= 1

    async def _loop(self) -> None:
        assert self.queue is not None and self._full is not None
        last = 1
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # requests already read by this turn of the loop join
            # under concurrent load, wait (at most the window) for as many requests as the last batch had
            self._target = min(last, self.max_batch) - 1
            if self.queue.qsize() < self._target:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), self.window_s)
                except asyncio.TimeoutError:
                    pass
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            last = len(batch)
            batch = self._batch = [p for p in batch if not p.future.done()]  # minus clients that went away
            if not batch:
                continue
            self.sizes.observe(len(batch))
            try:
                answers = await self.run(self._score, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending, answer in zip(batch, answers):
                    if not pending.future.done():
                        pending.future.set_result(answer)

    def _score(self, batch: list[_Pending]) -> list[list[Recommendation]]:
        users = self.rec.users([p.ids for p in batch])  # one model call; each row ranked with its own k and exclusions
        excluded = [[*self.rec.exclude_ids(p.exclude), *(p.ids if p.exclude_seen else ())] for p in batch]
        return self.rec.rank_ids(users, [p.k for p in batch], excluded)

"""Micro-batching: requests that arrive together share one call of a batch function (one forward pass of a model
for many text queries), each caller awaiting its own result.

On a CPU a text tower's forward pass over 32 queries costs little more than over one, so under load the app
embeds every query waiting at that moment at once instead of one after another.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 64
MAX_WAIT_S = 0.003


@dataclass
class _Queue(Generic[Item, Result]):
    """What waits on one event loop: the items with their callers' futures, and the task that drains them."""

    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    draining: asyncio.Task[None] | None = None


class MicroBatcher(Generic[Item, Result]):
    """Gathers concurrent ``submit`` calls into batches of at most ``max_batch`` items, waiting at most
    ``max_wait_s`` for more after the first, and answers each batch with one ``function(items)`` (run in the
    threadpool; it returns one result per item, in order). One batch runs at a time; the items that arrive
    meanwhile make the next one.

    An error is its caller's alone: when a batch raises, each of its items is tried alone, so only the callers
    whose item fails get the error."""

    def __init__(
        self,
        function: Callable[[list[Item]], Sequence[Result]],
        max_batch: int = MAX_BATCH,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.function = function
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[Item, Result]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, item: Item) -> Result:
        """``function``'s result for ``item``, computed in a batch with the items submitted with it."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(loop, _Queue())
        future: asyncio.Future[Result] = loop.create_future()
        queue.waiting.append((item, future))
        if queue.draining is None:
            queue.draining = loop.create_task(self._drain(queue))
        return await future

    async def _drain(self, queue: _Queue[Item, Result]) -> None:
        """Run batches until nothing waits."""
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while queue.waiting:
                if len(queue.waiting) < self.max_batch:
                    await asyncio.sleep(self.max_wait_s)
                batch, queue.waiting = queue.waiting[: self.max_batch], queue.waiting[self.max_batch :]
                outcomes = await run_in_threadpool(self._outcomes, [item for item, _ in batch])
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        except BaseException:  # cancelled (the loop closes): no caller waits forever
            for _, future in [*batch, *queue.waiting]:
                if not future.done():
                    future.set_exception(RuntimeError("the server stopped before this query was answered"))
            queue.waiting.clear()
            raise
        finally:
            queue.draining = None

    def _outcomes(self, items: list[Item]) -> list[Result | Exception]:
        """One outcome per item: ``function(items)``'s results; when that raises, each item alone (its result, or
        the exception it raises)."""
        try:
            results = list(self.function(items))
        except Exception as error:  # noqa: BLE001 - told to the callers whose own item fails
            return [error] if len(items) == 1 else [self._alone(item) for item in items]
        if len(results) != len(items):
            return [RuntimeError(f"a batch of {len(items)} items gave {len(results)} results")] * len(items)
        return results

    def _alone(self, item: Item) -> Result | Exception:
        try:
            return self.function([item])[0]
        except Exception as error:  # noqa: BLE001 - the caller of this item gets it
            return error

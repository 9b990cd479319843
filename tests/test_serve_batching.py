"""``serve.batching.MicroBatcher``: concurrent calls share one batch, each caller gets its own result, and an error
reaches only the caller whose item caused it."""

from __future__ import annotations

import asyncio

import pytest

from dask_clip.serve.batching import MicroBatcher


class Doubler:
    """Doubles numbers, recording each batch it was called with; refuses negative numbers."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if any(item < 0 for item in items):
            raise ValueError(f"negative: {min(items)}")
        return [2 * item for item in items]


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_result() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, max_batch=64, max_wait_s=0.01)

    async def many() -> list[int]:
        return await asyncio.gather(*(batcher.submit(item) for item in range(20)))

    assert asyncio.run(many()) == [2 * item for item in range(20)]
    assert doubler.batches == [list(range(20))]
    assert asyncio.run(many()) == [2 * item for item in range(20)]  # another event loop: a fresh queue


def test_a_batch_holds_at_most_max_batch_items() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, max_batch=8, max_wait_s=0.01)

    async def many() -> list[int]:
        return await asyncio.gather(*(batcher.submit(item) for item in range(30)))

    assert asyncio.run(many()) == [2 * item for item in range(30)]
    assert [len(batch) for batch in doubler.batches] == [8, 8, 8, 6]
    assert [item for batch in doubler.batches for item in batch] == list(range(30))


def test_an_error_reaches_only_the_caller_whose_item_caused_it() -> None:
    doubler = Doubler()
    batcher = MicroBatcher(doubler, max_wait_s=0.01)

    async def many() -> list[int | BaseException]:
        return await asyncio.gather(*(batcher.submit(item) for item in (1, -5, 3)), return_exceptions=True)

    first, failed, third = asyncio.run(many())
    assert (first, third) == (2, 6)
    assert isinstance(failed, ValueError) and str(failed) == "negative: -5"
    assert doubler.batches[0] == [1, -5, 3]  # one batch first, then each item alone


def test_a_caller_alone_gets_its_error() -> None:
    batcher = MicroBatcher(Doubler(), max_wait_s=0)
    with pytest.raises(ValueError, match="negative: -1"):
        asyncio.run(batcher.submit(-1))
    assert asyncio.run(batcher.submit(4)) == 8  # the batcher still answers

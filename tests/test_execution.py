"""The execution layer's own helpers."""

from __future__ import annotations

from typing import Any

import dask
import pytest

from dask_clip import execution
from dask_clip.execution import SHARDS_PER_TASK, compute_in_batches


def _labelled(number: int, name: str, suffix: str) -> str:
    return f"{number}:{name}{suffix}"


def test_compute_in_batches_returns_one_result_per_shard_in_order_from_few_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed: list[int] = []

    def compute_here(tasks: list[Any]) -> list[Any]:
        computed.append(len(tasks))
        return list(dask.compute(*tasks, scheduler="sync"))

    monkeypatch.setattr(execution, "compute", compute_here)
    count = 2 * SHARDS_PER_TASK + 3
    results = compute_in_batches(_labelled, range(count), [f"s{i}" for i in range(count)], suffix="!")
    assert results == [f"{i}:s{i}!" for i in range(count)]
    assert computed == [3]  # 64 + 64 + 3 shards, computed together as three tasks


def test_compute_in_batches_of_no_shards_is_empty() -> None:
    assert compute_in_batches(_labelled, [], [], suffix="!") == []

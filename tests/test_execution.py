"""The execution layer's own helpers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

from dask_clip import execution
from dask_clip.errors import UnsupportedDaskError
from dask_clip.execution import SHARDS_PER_TASK, compute_in_batches, optimized_with_resources, task_functions


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


class _Marked:
    """A partition function carrying worker resources, as ``map_shards`` hands one to dask."""

    def __init__(self) -> None:
        self.resources = {"GPU": 0.5}

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        return part


def test_the_dask_internals_execution_reads_find_a_mapped_function_alone_and_fused() -> None:
    frame = dd.from_pandas(pd.DataFrame({"key": ["a", "b", "c"]}), npartitions=3)
    mapped = frame.map_partitions(_Marked(), meta=frame._meta)
    fused = mapped.assign(length=mapped.key.str.len())
    for collection in (mapped, fused.length.sum()):
        found = [function for _, function in task_functions(collection.optimize())]
        assert any(isinstance(function, _Marked) for function in found), (
            f"dask {dask.__version__}: execution.task_functions no longer finds the function of a map_partitions "
            "task: dask-expr's internals (Fused, Expr.walk, _parameters, operand) changed, and GPU tasks would "
            "no longer ask for their resources"
        )
    _, resources = optimized_with_resources(fused.length.sum())
    assert list(resources.by_name.values()) == [{"GPU": 0.5}]  # one fused task per partition, all of one name


def test_internals_that_are_not_there_are_an_error_naming_the_dask_version() -> None:
    with pytest.raises(UnsupportedDaskError, match=f"dask {dask.__version__} changed the dataframe internals"):
        task_functions(object())


def _write_later(path: str) -> str:
    time.sleep(1.0)
    Path(path).write_text("written by a task still running when another failed")
    return path


def _fail() -> None:
    raise ValueError("planted failure")


@pytest.mark.parametrize("on", ["threads", "client"])
def test_a_failure_comes_back_only_once_the_other_tasks_stopped_writing(request, tmp_path: Path, on: str) -> None:
    # a command removes its half-made output when a task fails: a sibling still writing would leave files behind
    if on == "client":
        request.getfixturevalue("client")
    late = tmp_path / "late.txt"
    # as a list of tasks, as the commands pass them
    both = [dask.delayed(_write_later)(str(late)), dask.delayed(_fail)()]
    with pytest.raises(ValueError, match="planted failure"):
        execution.compute(both)
    written_when_raised = late.exists()
    time.sleep(1.5)
    assert late.exists() == written_when_raised  # nothing was written after the error came back

"""The only place that maps work over shards and computes it.

- ``map_shards`` runs a function on each shard's rows, handing it a ``ShardTask``: the shard's small
  reference (index, stem, tar and parquet URLs, never the list of all shards) and a clock for its stage
  timings. Any failure inside becomes a ``ShardError`` that names the shard's file and keeps the original
  error as its cause; dask_clip's own errors, which say what they concern already, pass unchanged.
- ``compute`` runs a collection on the current Dask client, or on the threaded scheduler when there is
  none (never on processes, which would re-import the user's script); a failure is raised once the collection's
  other tasks have stopped running. Only the tasks that run a function
  ``map_shards`` was given ``resources`` for (an embedder's share of a GPU) ask for them; reading,
  shuffling and summing run on any worker.
- ``compute_in_batches`` runs a small function (a footer's read) on every shard, many shards per task.
- ``compute_per_shard`` computes one summary row per shard with a progress bar, and decides what a
  failure stops: a configuration error (a model that cannot be loaded) stops the run at once; a failing
  shard lets the others finish, then the first failure is raised.
- ``map_shuffled`` runs a function on each partition of rows that a shuffle gathered across shards.
- ``shuffle_to_shards`` brings rows computed across shards (attached vectors' positions), each naming its shard
  in ``SHARD_COLUMN``, back to the partition of their own shard (for ``dataset.map_shards_with_results``);
  ``shuffle_on_disk`` moves rows to the partition they name through Dask's P2P shuffle, which holds them on the
  workers' disks rather than in memory and grows linearly with the partition count (vectors to their cluster's
  partition; deduplication decisions back to their shard's).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask
import dask.dataframe as dd
import pandas as pd
from dask.local import get_sync

from dask_clip.distributed.client import current_client
from dask_clip.distributed.gpu_use import GPU_RESOURCE, warn_of_unused_gpus
from dask_clip.distributed.worker_setup import MemoryTuningPlugin
from dask_clip.errors import ConfigurationError, DaskClipError, ShardError, UnsupportedDaskError
from dask_clip.io.shards import Shard

logger = logging.getLogger(__name__)

STAGES = ("load_s", "wait_s", "decode_s", "infer_s", "write_s")
"""Stage timings a shard's summary reports, in seconds: ``load_s`` (model from the cache or loaded),
``wait_s`` (inference waiting for decoded images), ``decode_s`` (decode-thread time summed over threads,
plus decoding on the model's device), ``infer_s`` and ``write_s``."""
SHARDS_PER_TASK = 64
"""Shards one task handles in ``compute_in_batches``."""
_TIMINGS_ATTR = "dask_clip.stage_seconds"
_REFERENCE_COLUMNS = {"index": "int64", "stem": object, "tar_url": object, "parquet_url": object, "payload": object}
_prepared_clients: set[str] = set()
T = TypeVar("T")
SHARD_COLUMN = "_dask_clip_shard"
"""The column of rows computed across shards that names the shard (its position in the dataset) each belongs to."""


@dataclass(frozen=True)
class ShardRef:
    """What a task knows of its shard: its position in the dataset, its stem and its two files."""

    index: int
    stem: str
    tar_url: str
    parquet_url: str

    @classmethod
    def of(cls, index: int, shard: Shard) -> ShardRef:
        """The reference of ``shard``, at position ``index`` of its dataset."""
        return cls(index, shard.stem, shard.tar_url, shard.parquet_url)


@dataclass
class ShardTask:
    """Handed to the function ``map_shards`` runs: the shard, the id column of its rows, this shard's own
    ``payload`` (a string the caller gave for it, e.g. JSON) and the seconds spent in each stage."""

    shard: ShardRef
    id_col: str
    payload: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def add_seconds(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` towards ``stage`` (one of ``STAGES``)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the time the block takes towards ``stage``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(stage, time.perf_counter() - started)


def stage_timings(frame: pd.DataFrame) -> dict[str, float]:
    """The stage seconds recorded by every ``map_shards`` step that produced ``frame`` (NaN for stages none ran)."""
    return {**dict.fromkeys(STAGES, float("nan")), **frame.attrs.get(_TIMINGS_ATTR, {})}


def _with_timings(result: pd.DataFrame, inputs: pd.DataFrame, task: ShardTask) -> pd.DataFrame:
    merged = dict(inputs.attrs.get(_TIMINGS_ATTR, {}))
    for stage, seconds in task.seconds.items():
        merged[stage] = merged.get(stage, 0.0) + seconds
    result.attrs[_TIMINGS_ATTR] = merged
    return result


def _shard_references(shards: Sequence[Shard], indices: Sequence[int], payloads: Sequence[str]) -> dd.DataFrame:
    """A Dask frame of one row per shard (its ``ShardRef`` fields and payload), one partition each."""
    rows = [
        pd.DataFrame([[index, shard.stem, shard.tar_url, shard.parquet_url, payload]], columns=list(_REFERENCE_COLUMNS))
        for index, shard, payload in zip(indices, shards, payloads, strict=True)
    ]
    meta = pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in _REFERENCE_COLUMNS.items()})
    return dd.from_map(_identity, rows, meta=meta, label="shard-references", enforce_metadata=False)


def _identity(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


@contextlib.contextmanager
def failures_named(url: str) -> Iterator[None]:
    """Turn any failure in the block that is not one of dask_clip's own errors into a ``ShardError`` starting
    with ``url`` (the shard's tar, or the file being made), with the original error as its cause."""
    try:
        yield
    except DaskClipError:
        raise  # names its file already, or is about the configuration rather than this shard
    except Exception as error:
        raise ShardError(f"{url}: {type(error).__name__}: {error}") from error


def map_shards(
    function: Callable[..., pd.DataFrame],
    metadata: dd.DataFrame,
    shards: Sequence[Shard],
    meta: pd.DataFrame,
    *aligned: dd.DataFrame,
    id_col: str,
    label: str = "shard",
    indices: Sequence[int] | None = None,
    payloads: Sequence[str] | None = None,
    resources: Mapping[str, float] | None = None,
    **kwargs: Any,
) -> dd.DataFrame:
    """``function(rows, task, *aligned_parts, **kwargs)`` on each shard -> a frame like ``meta``, one per shard.

    ``metadata`` (whose rows are identified by ``id_col``) and every frame in ``aligned`` have one
    partition per shard, in the order of ``shards``; ``task`` is the shard's ``ShardTask``. ``indices``
    are the shards' positions in their dataset when ``shards`` is a subset of it (default: ``0, 1, ...``);
    ``payloads`` one string per shard, handed to that shard's task only (``task.payload``).
    Stage seconds the function records travel with its result (``stage_timings``), added to those of the
    steps before it. ``resources`` (``{"GPU": 0.25}``) are the Dask worker resources each of these tasks
    asks for when computed on a cluster whose workers offer them. A ``kwargs`` value may be a ``dask.delayed``
    object: each shard's task then waits for it and receives its value (e.g. centroids fitted across shards).
    """

    for frame in (metadata, *aligned):
        if frame.npartitions != len(shards):
            raise ValueError(
                f"a frame has {frame.npartitions} partitions for {len(shards)} shards: expected one per shard"
            )
    return dd.map_partitions(
        _OnShard(function, id_col, dict(resources or {})),
        metadata,
        _shard_references(
            shards,
            range(len(shards)) if indices is None else indices,
            [""] * len(shards) if payloads is None else payloads,
        ),
        *aligned,
        meta=meta,
        align_dataframes=False,
        enforce_metadata=False,
        token=label,
        **kwargs,
    )


@dataclass(frozen=True)
class _OnShard:
    """What ``map_shards`` runs on each shard; ``resources`` is what ``compute`` finds in the graph."""

    function: Callable[..., pd.DataFrame]
    id_col: str
    resources: dict[str, float]

    def __call__(
        self, rows: pd.DataFrame, reference: pd.DataFrame, *parts: pd.DataFrame, **kwargs: Any
    ) -> pd.DataFrame:
        fields = {name: reference[name].iloc[0] for name in _REFERENCE_COLUMNS}
        task = ShardTask(
            ShardRef(**{name: fields[name] for name in ("index", "stem", "tar_url", "parquet_url")}),
            self.id_col,
            str(fields["payload"]),
        )
        with failures_named(task.shard.tar_url):
            result = self.function(rows, task, *parts, **kwargs)
        return _with_timings(result, rows, task)


def map_shuffled(
    function: Callable[..., pd.DataFrame], frame: dd.DataFrame, meta: pd.DataFrame, *, label: str, **kwargs: Any
) -> dd.DataFrame:
    """``function(part, **kwargs)`` on each partition of ``frame`` -> a lazy frame like ``meta``, one partition
    each: for rows a shuffle gathered across shards (a group of equal hashes, the clusters of one partition)."""
    return frame.map_partitions(function, meta=meta, enforce_metadata=False, token=label, **kwargs)


def shuffle_to_shards(results: dd.DataFrame, shard_count: int) -> dd.DataFrame:
    """``results``' rows moved so that partition ``i`` holds exactly those whose ``SHARD_COLUMN`` is ``i``
    (``shard_count`` partitions, that column becomes the index), ready to be passed to ``map_shards`` as aligned.

    A tasks shuffle: Dask's P2P shuffle cannot move fixed-size list columns.
    """
    return results.set_index(SHARD_COLUMN, divisions=list(range(shard_count + 1)), shuffle_method="tasks")


def shuffle_on_disk(frame: dd.DataFrame, partition_column: str, partition_count: int) -> dd.DataFrame:
    """``frame``'s rows moved so that partition ``i`` holds exactly those whose ``partition_column`` is ``i``
    (``partition_count`` partitions, the column becomes the index), with Dask's P2P shuffle.

    The P2P shuffle writes what it moves to the workers' disks and reads each output partition back
    when it is needed, so a worker holds one input or one output partition at a time, not the whole
    frame. It moves flat Arrow columns only (encode vectors as ``binary``; pyarrow strings arrive as Python
    objects). Without a distributed client (the threaded scheduler of this process, for small data) it is
    a tasks shuffle, in memory.
    """
    divisions = list(range(partition_count + 1))
    method = "p2p" if current_client() is not None else "tasks"  # the threaded scheduler has no P2P
    return frame.set_index(partition_column, divisions=divisions, shuffle_method=method)


@dataclass(frozen=True)
class TaskResources:
    """The Dask annotation ``compute`` sends: the worker resources of each task, by the name of its key.

    The scheduler calls it with every key of the graph (``resources=`` accepts a callable); a task whose
    name is not in ``by_name`` asks for nothing.
    """

    by_name: Mapping[str, Mapping[str, float]]

    def __call__(self, key: Any) -> dict[str, float]:
        return dict(self.by_name.get(key[0] if isinstance(key, tuple) else key, {}))


def optimized_with_resources(collection: Any) -> tuple[Any, TaskResources]:
    """``collection`` optimised (lowered and fused as its computation would be), and the resources of the tasks
    that run a ``map_shards`` function given ``resources``. A fused task asks for the most any of its parts asks
    for, resource by resource.
    Collections that are not dataframes (``dask.delayed``) ask for nothing."""
    if not isinstance(collection, dd.DataFrame | dd.Series | dd.Scalar):
        return collection, TaskResources({})
    optimized = collection.optimize()
    by_name: dict[str, dict[str, float]] = {}
    for name, function in task_functions(optimized):
        wanted = getattr(function, "resources", None)
        if isinstance(wanted, dict) and wanted:
            task = by_name.setdefault(name, {})
            task.update({resource: max(amount, task.get(resource, 0.0)) for resource, amount in wanted.items()})
    return optimized, TaskResources(by_name)


def task_functions(optimized: dd.DataFrame | dd.Series | dd.Scalar) -> list[tuple[str, Any]]:
    """For each task of the optimised (lowered and fused) ``optimized``, its name and the ``func`` operand of every
    expression it runs (a fused task runs several; expressions without a ``func`` are left out).

    The one place that reads dask-expr's internals (``Fused``, ``Expr.walk``, ``_parameters``, ``operand``,
    ``_name``): ``UnsupportedDaskError`` naming dask's version when they are not there.
    """
    try:
        from dask.dataframe.dask_expr._expr import Fused

        return [
            (expr._name, part.operand("func"))
            for expr in optimized.expr.walk()
            for part in (expr.exprs if isinstance(expr, Fused) else [expr])
            if "func" in part._parameters
        ]
    except (ImportError, AttributeError) as error:
        raise UnsupportedDaskError(
            f"dask {dask.__version__} changed the dataframe internals dask_clip reads to find each task's "
            f"resources (Fused, Expr.walk, _parameters, operand, _name): {type(error).__name__}: {error}. "
            "Install a dask release dask_clip is tested with (see pyproject.toml)"
        ) from error


def offered(client: Any, resources: TaskResources) -> TaskResources | None:
    """``resources`` when some worker of ``client`` offers every resource they name, else None (logged once).

    Tasks asking for the ``GPU`` resource first have the cluster checked for GPUs they would leave unused
    (``warn_of_unused_gpus``); ``client`` None (the threaded scheduler) checks this process and returns None.
    """
    wanted = {name for needs in resources.by_name.values() for name in needs}
    workers = client.scheduler_info(n_workers=-1)["workers"] if client is not None and wanted else {}
    if GPU_RESOURCE in wanted:
        warn_of_unused_gpus(client, workers)
    if not wanted or client is None:
        return None
    if any(wanted <= set(info.get("resources", {})) for info in workers.values()):
        return resources
    logger.info("no worker offers resources %s; running without them", sorted(wanted))
    return None


def compute_in_batches(function: Callable[..., T], *per_shard: Sequence[Any], **common: Any) -> list[T]:
    """``[function(*values, **common) for values in zip(*per_shard)]``, computed (as ``compute`` does) with
    ``SHARDS_PER_TASK`` shards per task: for work on each shard too small to be a task of its own (reading
    its parquet's footer). ``per_shard`` are sequences of one value per shard, in shard order."""
    count = len(per_shard[0]) if per_shard else 0
    run = functools.partial(function, **common)
    tasks = [
        dask.delayed(_run_batch)(run, [values[start : start + SHARDS_PER_TASK] for values in per_shard])
        for start in range(0, count, SHARDS_PER_TASK)
    ]
    return [result for batch in compute(tasks) for result in batch]


def _run_batch(run: Callable[..., T], per_shard: list[Sequence[Any]]) -> list[T]:
    return [run(*values) for values in zip(*per_shard, strict=True)]


def _prepare(client: Any) -> None:
    """Register the worker set-up plugin (memory tuning) once per client."""
    if client.id not in _prepared_clients:
        client.register_plugin(MemoryTuningPlugin())
        _prepared_clients.add(client.id)


def compute(collection: Any) -> Any:
    """Compute ``collection`` on the current client (tasks asking for the resources ``map_shards`` gave them,
    where workers offer them), or on the threaded scheduler of this process when there is no client.

    When a task fails, its error is raised only once the collection's other tasks have stopped running: a caller
    that then removes what they were writing (a command's half-made output folder) finds nothing written after.
    """
    client = current_client()
    optimized, resources = optimized_with_resources(collection)
    if client is None:
        offered(None, resources)  # only to check this process for GPUs the run leaves unused
        return _compute_on_threads(optimized, optimize_graph=optimized is collection)[0]
    _prepare(client)
    future = client.compute(optimized, optimize_graph=False, resources=offered(client, resources))
    try:
        return client.gather(future)
    except Exception:
        wait_until_settled(client, graph_keys(optimized))
        raise


SETTLE_TIMEOUT_S = 600.0
"""After a failure, how long ``compute`` waits at most for the collection's other tasks to stop running."""
_UNSETTLED = frozenset({"waiting", "queued", "processing"})
"""Scheduler states of a task that has yet to run or is running (``no-worker`` waits for a worker: not counted)."""
_RUNNING_ON_WORKER = frozenset({"executing", "long-running", "cancelled", "resumed"})
"""Worker states of a task whose function may still be running: once a computation fails, the scheduler releases
its other tasks, and a worker marks those it is executing ``cancelled`` while their function runs on."""


def wait_until_settled(client: Any, keys: list[Any], timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Block until none of ``keys`` is waiting, queued or running, on the scheduler or on a worker, or ``timeout``
    seconds have passed (a warning then says how many still run)."""
    deadline, ours = time.monotonic() + timeout, set(keys)
    pending = client.run_on_scheduler(_unsettled, keys)
    while True:
        running = set().union(*client.run(_running_here).values()) & ours
        if not pending and not running:
            return
        if time.monotonic() > deadline:
            logger.warning(
                "%d tasks of a failed computation still run after %.0f s", len(pending) + len(running), timeout
            )
            return
        time.sleep(0.1)
        pending = client.run_on_scheduler(_unsettled, pending) if pending else []


def graph_keys(collection: Any) -> list[Any]:
    """Every task key of ``collection``: a Dask collection or a list of them (as ``compute`` takes)."""
    parts = collection if isinstance(collection, list | tuple) else [collection]
    keys: dict[Any, None] = {}
    for part in parts:
        keys.update(dict.fromkeys(part.__dask_graph__().keys()))
    return list(keys)


def _unsettled(keys: list[Any], dask_scheduler: Any = None) -> list[Any]:
    """On the scheduler: those of ``keys`` whose task has yet to run or is running."""
    tasks = dask_scheduler.tasks
    return [key for key in keys if key in tasks and tasks[key].state in _UNSETTLED]


def _running_here(dask_worker: Any = None) -> list[Any]:
    """On a worker: the keys of the tasks whose function may be running on it."""
    return [key for key, task in dask_worker.state.tasks.items() if task.state in _RUNNING_ON_WORKER]


def compute_per_shard(summaries: dd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """Compute a frame of one summary row per shard (with a ``rows`` column), shard by shard.

    Each shard is computed on its own: a progress bar (``tqdm``, a widget in notebooks) advances as shards
    finish, showing rows per second; a failing shard lets the others finish (their output is kept), then
    the first failure is raised and the others are logged; a configuration error (e.g. a worker cannot
    load the model) stops the remaining shards and is raised at once. On a distributed client each shard
    is a future. Without a client, shards whose work is independent run on a pool of threads of this
    process; when they share work (a deduplication decides across shards), the threaded scheduler runs
    them together and stops at the first failure.
    """
    from tqdm.auto import tqdm

    optimized, resources = optimized_with_resources(summaries)
    parts = optimized.to_delayed(optimize_graph=False)
    with tqdm(total=len(parts), unit="shard", disable=not progress, desc="shards") as bar:
        counter = _ShardCounter(bar)
        client = current_client()
        if client is not None:
            _prepare(client)
            futures = client.compute(parts, optimize_graph=False, resources=offered(client, resources))
            stop = functools.partial(_cancel_and_settle, client, futures, optimized)
            return _collect(as_completed_futures(futures), counter, summaries._meta, cancel=stop)
        offered(None, resources)  # only to check this process for GPUs the run leaves unused
        graphs = _independent_graphs(parts)
        if graphs is None:
            with _LocalProgress({part.key for part in parts}, counter):
                results = _compute_on_threads(*parts)
            return pd.concat(results) if results else summaries._meta
        with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dask_clip-shard") as pool:
            pending = [pool.submit(get_sync, graph, key) for graph, key in graphs]
            return _collect(_finished_local(pending), counter, summaries._meta, cancel=lambda: _cancel(pending))


def _independent_graphs(parts: list[Any]) -> list[tuple[dict[Any, Any], Any]] | None:
    """Each part's own task graph and key when no task is shared between parts, else None."""
    from dask.core import get_dependencies

    if not parts:
        return []
    graph: dict[Any, Any] = {}
    for layered in {id(part.dask): part.dask for part in parts}.values():  # parts usually share one graph
        graph.update(layered)
    owners: dict[Any, int] = {}
    graphs = []
    for index, part in enumerate(parts):
        keys, stack = set(), [part.key]
        while stack:
            key = stack.pop()
            if key in keys:
                continue
            if owners.setdefault(key, index) != index:
                return None
            keys.add(key)
            stack.extend(get_dependencies(graph, key))
        graphs.append(({key: graph[key] for key in keys}, part.key))
    return graphs


def as_completed_futures(futures: list[Any]) -> Iterator[tuple[Any, BaseException | None]]:
    """Each distributed future's result or exception, as they finish."""
    from distributed import as_completed

    for future in as_completed(futures):
        yield (None, future.exception()) if future.status == "error" else (future.result(), None)


def _finished_local(pending: list[Future[Any]]) -> Iterator[tuple[Any, BaseException | None]]:
    for future in concurrent.futures.as_completed(pending):
        if future.cancelled():
            continue
        error = future.exception()
        yield (None, error) if error is not None else (future.result(), None)


def _cancel(futures: list[Any]) -> None:
    for future in futures:
        future.cancel()


def _cancel_and_settle(client: Any, futures: list[Any], collection: Any) -> None:
    """Cancel ``futures``, then wait for ``collection``'s tasks still running (its keys found only now: listing
    them costs a walk of the whole graph, which a run that does not fail never pays)."""
    _cancel(futures)
    wait_until_settled(client, graph_keys(collection))


def _compute_on_threads(*collections: Any, **options: Any) -> tuple[Any, ...]:
    """``dask.compute`` on the threaded scheduler, with a pool of its own: it returns or raises only once the
    tasks it started have finished (Dask's own pool would let them run on after a failure)."""
    pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dask_clip-compute")
    try:
        return dask.compute(*collections, scheduler="threads", pool=pool, **options)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardCounter:
    """Shards done, rows and failures so far, shown on a progress bar."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.rows, self.failed, self.started = bar, 0, 0, time.perf_counter()

    def done(self, part: pd.DataFrame | None) -> None:
        if part is None:
            self.failed += 1
        else:
            self.rows += int(part["rows"].sum())
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(rows=self.rows, failed=self.failed, rows_per_s=f"{rate:.1f}")
        self.bar.update(1)


def _collect(
    outcomes: Iterator[tuple[Any, BaseException | None]], counter: _ShardCounter, meta: pd.DataFrame, cancel: Any
) -> pd.DataFrame:
    """Gather shard results as they finish: a configuration error cancels the rest and is raised at once;
    other failures are raised once every shard has finished (the first; the others are logged)."""
    parts, failures = [], []
    for result, error in outcomes:
        counter.done(result if error is None else None)
        if error is None:
            parts.append(result)
            continue
        if isinstance(error, ConfigurationError):
            cancel()
            raise error
        failures.append(error)
    if failures:
        for error in failures[1:]:
            logger.error("shard failed: %s", error)
        if len(failures) > 1:
            logger.error("%d of %d shards failed; raising the first", len(failures), counter.bar.total)
        raise failures[0]
    return pd.concat(parts) if parts else meta


class _LocalProgress:
    """Advance a ``_ShardCounter`` as the threaded scheduler finishes each task of ``final_keys``."""

    def __init__(self, final_keys: set[Any], counter: _ShardCounter) -> None:
        from dask.callbacks import Callback

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if key in final_keys:
                counter.done(result)

        self.callback = Callback(posttask=posttask)

    def __enter__(self) -> None:
        self.callback.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.callback.__exit__(*exc)

"""The operation protocol: what every step that adds columns to a dataset declares, and how it is applied.

An operation says

- ``config()``: its options that change its output, and none that do not (threads, batch sizes: a re-run
  with other values keeps its results); they are recorded next to the columns it writes, after its identity
  (``recorded_identity()``: its class, or the function that applies it);
- ``input_columns(dataset)``: the columns it reads, checked before anything runs, and
  ``reads_tar(dataset)``: whether it reads the shards' tars;
- ``reasons()``: which column gives the reason where one it writes is null;
- ``sources(dataset)``: the provenance of each column it writes (by default the same record for all);
- ``output_columns(dataset)``: the columns it writes, with their types (for the Dask ``meta``);
- ``cross_shard``: whether its output for one shard depends on other shards (deduplication);
- ``model``: optionally, a ``ModelSpec`` (cache key + loader) for the per-worker model cache (a
  ``ModelOperation`` builds it, and asks for a share of a GPU);
- ``label``: how progress and logs show it (``name`` unless given another);
- ``process_shard(rows, task, model)``: for a per-shard operation, its new columns for one shard;
- ``fitted(dataset)``: for an operation whose configuration depends on statistics of the whole dataset (a global
  threshold), itself configured with them, computed when it is applied, so the record of its output names them.

``operation(dataset)`` then returns a new dataset with those columns, computed lazily, shard by shard,
through ``execution.map_shards``, once the derived columns it reads are known to come from one run over the
data the shards hold now (``dataset.consistency``: the shards' footers are read for it). An operation whose
work moves rows between shards (a deduplication; attaching vectors, joined by a shuffle) overrides ``build``
instead of ``process_shard``, and brings its results back to their shards (``dataset.map_shards_with_results``;
a deduplicator's decisions through ``Deduplicator.join_decisions``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import dask.dataframe as dd
import pandas as pd

from dask_clip.arguments import fraction
from dask_clip.columns import require_columns
from dask_clip.dataset.consistency import check_consumed, contents_checked
from dask_clip.distributed.model_cache import get_or_load, make_cache_key
from dask_clip.execution import ShardTask
from dask_clip.provenance import Computed, Plain

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


@dataclass(frozen=True)
class ModelSpec:
    """How a worker gets an operation's model: ``load()`` once per worker process and ``cache_key``.

    The key is fixed when the operation is built on the client, so every copy of the operation that
    reaches a worker finds the same cached model.
    """

    cache_key: str
    load: Callable[[], Any]

    def get(self) -> Any:
        """The model from this process's cache, loading it on first use."""
        return get_or_load(self.cache_key, self.load)


class Operation(ABC):
    """A step that adds (or replaces) columns of a dataset: ``operation(dataset) -> new dataset``."""

    cross_shard: ClassVar[bool] = False
    model: ModelSpec | None = None
    function_name: ClassVar[str | None] = None
    """The function that applies this operation (``clip_score``), if any: provenance names it by that function."""

    @property
    def name(self) -> str:
        """How errors and task names refer to this operation."""
        return type(self).__name__

    def recorded_identity(self) -> dict[str, str]:
        """How provenance names this operation: ``{"function": function_name}``, else ``{"class": <its class>}``."""
        return {"function": self.function_name} if self.function_name else {"class": type(self).__name__}

    @property
    def label(self) -> str:
        """How progress (Dask's task names) and logs show this step; never part of what identifies its output."""
        return self.name

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The options that change this operation's output, JSON-serialisable (its identity apart)."""

    def recorded_config(self) -> dict[str, Any]:
        """What provenance records of this operation: its ``recorded_identity()`` and its ``config()``."""
        return {**self.recorded_identity(), **self.config()}

    @abstractmethod
    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        """The columns this operation reads from ``dataset``."""

    @abstractmethod
    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        """The columns it writes to ``dataset``, as empty columns of their types."""

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:  # noqa: B027 - an optional hook
        """Further checks of the input columns' types (after their presence is checked); none by default."""

    def task_resources(self) -> dict[str, float]:
        """Dask worker resources one shard task needs (none by default)."""
        return {}

    def reads_tar(self, dataset: ImageTextPairDataset) -> bool:
        """Whether this operation reads the shards' tars (then a tar's identity is part of its inputs)."""
        return False

    def reasons(self) -> dict[str, str]:
        """For each column it writes that may be null, the column that then holds the reason (none by default)."""
        return {}

    def properties(self) -> dict[str, Any]:
        """How it computes its columns without changing what they hold (a model's engine), recorded beside them and
        never part of their identity (none by default)."""
        return {}

    def source(self, dataset: ImageTextPairDataset) -> Computed:
        """The provenance of the columns this operation writes to ``dataset``."""
        reads = {column: dataset.provenance.get(column) or Plain(column) for column in self.input_columns(dataset)}
        return Computed(
            self.recorded_config(), reads, self.reads_tar(dataset), self.cross_shard, self.reasons(), self.properties()
        )

    def sources(self, dataset: ImageTextPairDataset) -> dict[str, Computed]:
        """The provenance of each column this operation writes to ``dataset``: ``source(dataset)`` for all by default
        (an operation that runs several configurations at once, ``MultiEmbedder``, gives each column its own)."""
        return dict.fromkeys(self.output_columns(dataset), self.source(dataset))

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        """A per-shard operation's new columns for one shard's ``rows``: name -> values aligned with ``rows``."""
        raise NotImplementedError(f"{self.name} works across shards: it overrides build()")

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """The new metadata frame, one partition per shard (by default ``process_shard`` on each shard)."""
        return dataset.map_shards(
            self._run_on_shard,
            output_meta,
            label=self.label,
            resources=self.task_resources(),
        )

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Lazily add this operation's columns to every shard of ``dataset``; columns of the same names are replaced.

        ``MixedProvenanceError`` when a derived column it reads is not what one run produced over the data the
        shards hold now (its own earlier output, the same configuration, is left out: this run finishes it).
        """
        inputs = self.input_columns(dataset)
        require_columns(dataset.meta, inputs, self.name)
        check_consumed(dataset, inputs, self.name, own=self.recorded_config())
        dataset = contents_checked(dataset, inputs, self.name)
        self.check_inputs(dataset)
        operation = self.fitted(dataset)
        outputs = operation.output_columns(dataset)
        frame = operation.build(dataset, dataset.meta.assign(**outputs))
        return dataset.with_metadata(frame, operation.sources(dataset))

    def fitted(self, dataset: ImageTextPairDataset) -> Operation:
        """This operation configured with what it learns from the whole of ``dataset`` (eagerly, once its inputs
        are checked): itself by default. Its ``config()`` then names what was learnt, so a re-run over other data
        records another configuration."""
        return self

    def _run_on_shard(self, rows: pd.DataFrame, task: ShardTask) -> pd.DataFrame:
        model = None
        if self.model is not None:
            with task.timed("load_s"):
                model = self.model.get()
        columns = self.process_shard(rows, task, model)
        return rows.assign(**{name: _aligned(values, rows.index) for name, values in columns.items()})


class ModelOperation(Operation):
    """An operation that runs a model on each shard: the embedders and the classifiers.

    - ``device``: ``None`` picks CUDA when the worker has it, else the CPU;
    - ``num_gpus_per_worker``: the share of one GPU each shard's task asks for, as the Dask worker resource
      ``GPU`` where workers offer it (nothing with ``device="cpu"``);
    - ``name``: the label progress and logs show (NeMo Curator's spelling), never part of the identity of the
      columns it writes nor of its model-cache key, so renaming a step recomputes nothing.
    """

    def __init__(self, *, device: str | None, num_gpus_per_worker: float, name: str | None) -> None:
        self.device = device
        self.num_gpus_per_worker = fraction("num_gpus_per_worker", num_gpus_per_worker)
        self._label = name

    @property
    def label(self) -> str:
        return self._label or self.name

    def task_resources(self) -> dict[str, float]:
        return {"GPU": self.num_gpus_per_worker} if self.device != "cpu" and self.num_gpus_per_worker else {}

    def model_spec(self, weights: Mapping[str, Any], load: Callable[[], Any]) -> ModelSpec:
        """The per-worker cache entry of the model ``load()`` returns, keyed by ``weights`` (everything that changes
        the loaded model: which weights, their version included) and the device."""
        return ModelSpec(make_cache_key(self.name, {**weights, "device": self.device}), load)


def _aligned(values: Any, index: pd.Index) -> pd.Series:
    """``values`` (an array, or a Series in the rows' order) as a column on ``index``."""
    return pd.Series(values.array if isinstance(values, pd.Series) else values, index=index)

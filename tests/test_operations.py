"""The operation protocol and the execution layer: what every operation gets for free."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dask_clip import (
    AestheticClassifier,
    ClipImageEmbedder,
    ImageTextPairDataset,
    MissingDependencyError,
    Operation,
    ShardError,
    UsageError,
    prepare_workers,
)
from dask_clip.columns import FLOAT64, empty_column
from dask_clip.execution import ShardTask
from dask_clip.models.classifiers import AestheticMlp
from dask_clip.optional import EXTRAS, install_hint, require


class RowNumber(Operation):
    """A minimal operation: each row's position in its shard, or a failure in one shard."""

    def __init__(self, failing_stem: str | None = None) -> None:
        self.failing_stem = failing_stem

    def config(self) -> dict[str, Any]:
        return {}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [dataset.id_col]

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {"row_number": empty_column(FLOAT64)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        if task.shard.stem == self.failing_stem:
            raise ZeroDivisionError("a bug in this operation")
        with task.timed("infer_s"):
            return {"row_number": pd.array(np.arange(len(rows), dtype=float), dtype=FLOAT64)}


def test_an_operation_adds_its_columns_shard_by_shard(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    numbered = RowNumber()(dataset)
    assert numbered.metadata.npartitions == 3
    assert numbered.provenance["row_number"].operation == {"class": "RowNumber"}
    frame = numbered.metadata.compute()
    assert frame["row_number"].tolist() == [float(i) for _ in range(3) for i in range(6)]
    assert frame.drop(columns="row_number").equals(dataset.metadata.compute())


def test_a_failure_inside_a_shard_names_its_tar_and_keeps_the_cause(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ShardError, match=r"00001\.tar: ZeroDivisionError: a bug in this operation") as caught:
        RowNumber(failing_stem="00001")(dataset).metadata.compute(scheduler="threads")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_a_missing_input_column_names_the_operation(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    renamed = dataset.with_metadata(dataset.metadata.rename(columns={"key": "id"}))
    with pytest.raises(UsageError, match=r"RowNumber reads columns \['key'\], which the dataset lacks"):
        RowNumber()(renamed)


def test_datasets_compare_by_identity(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    again = ImageTextPairDataset.from_webdataset(str(shards))
    assert dataset == dataset
    assert dataset != again  # two lazy frames are never compared element by element
    assert dataset in [dataset]


def test_nemo_curator_spellings_are_aliases(tiny_model: Path) -> None:
    nemo = ClipImageEmbedder(str(tiny_model), model_inference_batch_size=8, image_embedding_column="clip")
    assert (nemo.batch_size, nemo.embedding_column) == (8, "clip")
    assert ClipImageEmbedder(str(tiny_model)).batch_size == 32
    with pytest.raises(UsageError, match="batch_size=4 and its alias model_inference_batch_size=8 disagree"):
        ClipImageEmbedder(str(tiny_model), batch_size=4, model_inference_batch_size=8)
    with pytest.raises(TypeError):
        ClipImageEmbedder(str(tiny_model), 8)  # options are keyword-only


def test_prepare_workers_takes_any_operation_with_a_model(client, tmp_path: Path) -> None:
    path = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(32).state_dict(), path)
    classifier = AestheticClassifier(str(path), embedding_dim=32)
    prepare_workers(classifier, client)
    loaded = client.run(lambda: sorted(__import__("dask_clip").cache_info(client=None)["local"]))
    assert all(classifier.model.cache_key in keys for keys in loaded.values()), loaded
    with pytest.raises(UsageError, match="RowNumber has no model to load"):
        prepare_workers(RowNumber(), client)


def test_workers_are_tuned_by_a_plugin_once_dask_clip_computes(client, shards: Path) -> None:
    RowNumber()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata(str(shards.parent / "out"))
    plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert all("dask_clip-memory-tuning" in names for names in plugins.values()), plugins


def test_optional_dependencies_name_their_extra() -> None:
    with pytest.raises(
        MissingDependencyError, match=r'TimmImageEmbedder needs no_such_module: pip install "dask_clip\[timm\]"'
    ):
        require("no_such_module", "timm", "TimmImageEmbedder")
    extras = set(metadata("dask_clip").get_all("Provides-Extra"))
    assert extras >= EXTRAS, "a hint names an extra that the package does not define"
    with pytest.raises(ValueError, match="unknown extra"):
        install_hint("cuda")


def test_every_error_class_travels_from_a_worker_intact() -> None:
    """Dask sends a task's exception to the client pickled (with tblib); one that does not survive the trip
    arrives as a bare ``Exception`` that no ``except DaskClipError`` catches."""
    from distributed import protocol
    from tblib import pickling_support

    import dask_clip.errors

    classes = [value for value in vars(dask_clip.errors).values() if isinstance(value, type)]
    for cls in classes:
        error = cls("some/00001.parquet: cannot write: [Errno 28] No space left on device")
        pickling_support.install(error)
        back = protocol.pickle.loads(protocol.pickle.dumps(error))
        assert type(back) is cls and str(back) == str(error), cls

"""Every public step that adds columns is an ``Operation``, names itself in provenance as saved datasets
record it, and learns a vector width without computing a shard."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dask_clip
from dask_clip import (
    AestheticClassifier,
    ClipScore,
    ColumnError,
    ExactDeduplicator,
    ImageTextPairDataset,
    LocateImages,
    Operation,
    SemanticDeduplicator,
    ThresholdFilter,
    testing,
)
from dask_clip.models.classifiers import AestheticMlp

FUNCTION_ENTRIES = {
    "clip_score": "ClipScore",
    "keep_by_threshold": "ThresholdFilter",
    "keep_top_fraction": "TopFractionFilter",
    "keep_near_target": "NearTargetFilter",
    "combine_decisions": "CombineDecisions",
    "locate_images": "LocateImages",
    "decontaminate": "Decontaminator",
    "ImageTextPairDataset.attach_embeddings": "AttachEmbeddings",
}
"""Public functions and dataset methods that add columns, and the operation each applies."""


def operations_exported() -> dict[str, type[Operation]]:
    """Every subclass of ``Operation`` in ``dask_clip`` (base classes too) once the public names are imported."""
    for name in dask_clip.__all__:
        getattr(dask_clip, name)
    found: dict[str, type[Operation]] = {}
    stack = list(Operation.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("dask_clip."):
            found[cls.__name__] = cls
    return found


def functions_adding_columns() -> list[str]:
    """Public functions of ``dask_clip`` and methods of the dataset that return a new dataset from one."""
    names = [
        name
        for name in dask_clip.__all__
        if inspect.isfunction(getattr(dask_clip, name))
        and inspect.signature(getattr(dask_clip, name)).return_annotation == "ImageTextPairDataset"
    ]
    not_steps = {"from_webdataset", "with_metadata"}  # the dataset's constructor and what every step calls
    for name, method in vars(ImageTextPairDataset).items():
        public = inspect.isfunction(method) and not name.startswith("_") and name not in not_steps
        if public and inspect.signature(method).return_annotation == "ImageTextPairDataset":
            names.append(f"ImageTextPairDataset.{name}")
    return names


def test_every_public_step_that_adds_columns_is_an_operation_of_ops_or_embedders() -> None:
    operations = operations_exported()
    assert {"ClipImageEmbedder", "TimmImageEmbedder", "SemanticDeduplicator", "AttachEmbeddings"} <= set(operations)
    for name, cls in operations.items():
        if cls.__module__ == "dask_clip.operation":  # the protocol's own bases: no step, nothing to apply
            assert inspect.isabstract(cls), f"{name} in dask_clip.operation can be applied: move it to ops/"
            continue
        assert cls.__module__.startswith(("dask_clip.ops.", "dask_clip.embedders.")), (name, cls.__module__)
    functions = functions_adding_columns()
    assert sorted(functions) == sorted(FUNCTION_ENTRIES), "a new step: make it an Operation and list it"
    for function, operation in FUNCTION_ENTRIES.items():
        assert operations[operation].function_name == function.rsplit(".", 1)[-1], function


@pytest.fixture
def vectors_dataset(tmp_path: Path) -> ImageTextPairDataset:
    vectors = {"a": np.ones(4), "b": np.arange(4.0), "c": None}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=2)
    return ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))


def test_operations_record_themselves_as_datasets_saved_before_record_them(
    vectors_dataset: ImageTextPairDataset, tmp_path: Path
) -> None:
    """The configurations written into files by earlier versions, key for key: a saved column stays finished."""
    checkpoint = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(4).state_dict(), checkpoint)
    stat = os.stat(checkpoint)
    recorded = {
        ClipScore(): {"function": "clip_score", "image_column": "image_embedding", "text_column": "text_embedding"},
        ThresholdFilter("score", min=0.5): {
            "function": "keep_by_threshold",
            "column": "score",
            "min": 0.5,
            "max": None,
            "keep_missing": False,
        },
        ExactDeduplicator(): {"class": "ExactDeduplicator", "hash_column": "sha256"},
        LocateImages(): {"function": "locate_images"},
        SemanticDeduplicator(): {
            "class": "SemanticDeduplicator",
            "eps": 0.01,
            "n_clusters": 1000,
            "which_to_keep": "hard",
            "embedding_column": "image_embedding",
            "seed": 0,
            "max_iter": 30,
            "kmeans_sample_size": 100_000,
            "max_cluster_size": 100_000,
            "max_copies": 2,  # added with boundary copies: decisions saved before them are decided again
        },
        AestheticClassifier(str(checkpoint), embedding_dim=4): {
            "class": "AestheticClassifier",
            "model_path": os.path.realpath(checkpoint),
            "checkpoint_version": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "embedding_column": "image_embedding",
            "embedding_dim": 4,
        },
    }
    for operation, expected in recorded.items():
        assert operation.source(vectors_dataset).operation == expected, type(operation).__name__


def list_column_shards(folder: Path, vectors: dict[str, np.ndarray | None], rows_per_shard: int) -> Path:
    """Shards whose embeddings are ``list<float32>`` recording no width, as another tool writes them."""
    for parquet in testing.write_embedding_shards(folder, vectors, rows_per_shard=rows_per_shard):
        table = pq.read_table(parquet)
        lists = table["image_embedding"].cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"key": table["key"], "image_embedding": lists}), parquet)
    return folder


def never_computed(dataset: ImageTextPairDataset) -> ImageTextPairDataset:
    """``dataset`` whose every partition raises when computed."""

    def fail(rows: pd.DataFrame) -> pd.DataFrame:
        raise AssertionError("a partition was computed")

    return dataset.with_metadata(dataset.metadata.map_partitions(fail, meta=dataset.meta))


def test_operations_on_vectors_of_unrecorded_width_compute_nothing_when_applied(client, tmp_path: Path) -> None:
    vectors = {"a": np.ones(4), "b": np.arange(4.0), "c": None, "d": np.arange(4.0) + 0.001}
    dataset = ImageTextPairDataset.from_webdataset(str(list_column_shards(tmp_path, vectors, rows_per_shard=2)))
    assert dataset.meta["image_embedding"].dtype == pd.ArrowDtype(pa.list_(pa.float32()))
    lazy = never_computed(
        dataset.with_metadata(dataset.metadata.assign(text_embedding=dataset.metadata["image_embedding"]))
    )
    ClipScore()(lazy)
    SemanticDeduplicator(n_clusters=1)(lazy)

    frame = SemanticDeduplicator(n_clusters=1, eps=0.01)(dataset).metadata.compute()  # P2P: on the cluster
    assert frame.set_index("key")["duplicate_of"].to_dict() == {"a": None, "b": None, "c": None, "d": "b"}


def test_shards_of_different_unrecorded_widths_are_named(tmp_path: Path) -> None:
    list_column_shards(tmp_path / "narrow", {"a": np.ones(4), "b": np.ones(4)}, rows_per_shard=2)
    list_column_shards(tmp_path / "wide", {"c": np.ones(6), "d": np.ones(6)}, rows_per_shard=2)
    for suffix in (".tar", ".parquet"):
        (tmp_path / "wide" / f"00000{suffix}").rename(tmp_path / "narrow" / f"00001{suffix}")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "narrow"))
    with pytest.raises(
        ColumnError, match=r"'image_embedding' holds 4-d embeddings in shard 00000 but 6-d ones in shard 00001"
    ):
        SemanticDeduplicator(n_clusters=1)(dataset).metadata.compute(scheduler="threads")

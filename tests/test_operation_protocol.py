"""Every public step that adds columns is an ``Operation``, names itself in provenance as saved datasets
record it, and learns a vector width without computing a shard."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dask_clip
from dask_clip import (
    AestheticClassifier,
    ClipScore,
    ExactDeduplicator,
    ImageTextPairDataset,
    Operation,
    SemanticDeduplicator,
    ThresholdFilter,
    testing,
)
from dask_clip.models.classifiers import AestheticMlp

FUNCTION_ENTRIES = {
    "clip_score": "ClipScore",
    "keep_by_threshold": "ThresholdFilter",
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

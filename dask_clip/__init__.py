"""dask_clip: CLIP image embeddings for WebDataset image-text shards, computed on Dask.

The top level is lazy: ``import dask_clip`` imports neither torch, faiss nor any GPU library; each name
below (the error classes of ``dask_clip.errors`` included) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_NAMES = {
    "get_client": "dask_clip.distributed.client",
    "cache_info": "dask_clip.distributed.model_cache",
    "clear_cache": "dask_clip.distributed.model_cache",
    "prepare_workers": "dask_clip.distributed.worker_setup",
    "ImageTextPairDataset": "dask_clip.dataset",
    "Operation": "dask_clip.operation",
    "ClipImageEmbedder": "dask_clip.embedders.clip",
    "TimmImageEmbedder": "dask_clip.embedders.timm",
    "MultiEmbedder": "dask_clip.embedders.multi",
    "ClipTextEmbedder": "dask_clip.embedders.clip_text",
    "embeddings_to_numpy": "dask_clip.columns",
    "SemanticDeduplicator": "dask_clip.ops.semantic_dedup",
    "ExactDeduplicator": "dask_clip.ops.exact_dedup",
    "AestheticClassifier": "dask_clip.ops.classifiers",
    "NsfwClassifier": "dask_clip.ops.classifiers",
    "ThresholdFilter": "dask_clip.ops.filters",
    "keep_by_threshold": "dask_clip.ops.filters",
    "TopFractionFilter": "dask_clip.ops.top_fraction",
    "CombineDecisions": "dask_clip.ops.combine",
    "combine_decisions": "dask_clip.ops.combine",
    "keep_top_fraction": "dask_clip.ops.top_fraction",
    "NearTargetFilter": "dask_clip.ops.near_target",
    "keep_near_target": "dask_clip.ops.near_target",
    "ClipScore": "dask_clip.ops.clip_score",
    "Decontaminator": "dask_clip.ops.decontaminate",
    "decontaminate": "dask_clip.ops.decontaminate",
    "AttachEmbeddings": "dask_clip.ops.attach",
    "clip_score": "dask_clip.ops.clip_score",
    "LocateImages": "dask_clip.ops.locate",
    "locate_images": "dask_clip.ops.locate",
    "show": "dask_clip.dataset.review",
    **dict.fromkeys(
        [
            "CheckpointError",
            "ColumnError",
            "ConfigurationError",
            "DaskClipError",
            "DataError",
            "DatasetLayoutError",
            "DatasetNotFoundError",
            "DeviceOutOfMemoryError",
            "DeviceSetupError",
            "DeviceUnavailableError",
            "FolderLockedError",
            "ImageLocationError",
            "IndexFileError",
            "MissingDependencyError",
            "MixedProvenanceError",
            "ModelLoadError",
            "ShardError",
            "ShardMetadataError",
            "ShardReadError",
            "StaleIndexError",
            "UnsupportedDaskError",
            "UsageError",
            "WriteError",
        ],
        "dask_clip.errors",
    ),
}

__all__ = [*sorted(_LAZY_NAMES), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'dask_clip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

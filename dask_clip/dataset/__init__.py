"""The dataset (``ImageTextPairDataset``) and what it does with itself: save its metadata (``save``, planned
by ``plan``), write new shards (``reshard``), export its embeddings (``export``), search them (``search``)
and describe the provenance its files record (``info``)."""

from dask_clip.dataset._dataset import ImageTextPairDataset

__all__ = ["ImageTextPairDataset"]

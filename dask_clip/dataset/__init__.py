"""The dataset (``ImageTextPairDataset``) and what it does with itself: save its metadata (``save``), write new
shards (``reshard``), export its embeddings (``export``) and search them (``search``)."""

from dask_clip.dataset._dataset import ImageTextPairDataset

__all__ = ["ImageTextPairDataset"]

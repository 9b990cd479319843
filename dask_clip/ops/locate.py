"""Locate each row's image in its shard's tar: the byte offset of the image member's data and its size, so that
one image is later read with one ranged read (``io.image_access``) instead of a scan of the tar.

The tar's member headers are read and each member's data is seeked past, never read. The locations are true of
the tar they were read from: their provenance records the tar's identity (size, ETag or modification time), so
a tar replaced since makes them stale and a re-run locates its images again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from dask_clip.columns import INT64, empty_column, nullable
from dask_clip.execution import ShardTask
from dask_clip.io.image_access import image_locations
from dask_clip.io.tar_samples import RowKeys
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

OFFSET = "image_offset"
SIZE = "image_size"


class LocateImages(Operation):
    """Adds ``offset_column`` and ``size_column`` (``int64``): where each row's image member's data lies in its
    shard's tar, in bytes. Both are null where the row's sample has no image member (a failed download) or
    its image member is sparse. The image member is the one the embedders read (``Sample.image_member``), and
    keys match rows as they do for every operation (``RowKeys``); a tar key no row has is a ``ShardReadError``.
    Tars must be uncompressed (a ranged read of a compressed tar would not give the member's bytes).
    """

    function_name = "locate_images"

    def __init__(self, *, offset_column: str = OFFSET, size_column: str = SIZE) -> None:
        self.offset_column = offset_column
        self.size_column = size_column

    def config(self) -> dict[str, Any]:
        return {}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return []

    def reads_tar(self, dataset: ImageTextPairDataset) -> bool:
        return True

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.offset_column: empty_column(INT64), self.size_column: empty_column(INT64)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        keys = RowKeys(rows[task.id_col], task.shard.tar_url)
        located = image_locations(task.shard.tar_url, keys, len(rows))
        if located.unknown_keys:
            raise keys.unknown_keys_error(located.unknown_keys, task.id_col)
        return {
            self.offset_column: nullable(located.offsets, located.found, INT64),
            self.size_column: nullable(located.sizes, located.found, INT64),
        }


def locate_images(
    dataset: ImageTextPairDataset, offset_column: str = OFFSET, size_column: str = SIZE
) -> ImageTextPairDataset:
    """A new dataset with ``offset_column`` and ``size_column``: ``LocateImages`` applied to ``dataset``."""
    return LocateImages(offset_column=offset_column, size_column=size_column)(dataset)

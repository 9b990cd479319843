"""``dask-clip locate``: record where each row's image lies in its tar (byte offset and size), reading headers only."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_output_options,
    add_vector_layout_option,
    run_on_cluster,
    save,
)

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset


NAME = "locate"
HELP = "record each row's image offset and size in its tar (image_offset, image_size), for ranged reads"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    add_output_options(parser, overwrite="locate again even where the saved locations are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.ops.locate import LocateImages

    def locate(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return save(args, LocateImages()(dataset))

    def summarize(summary: pd.DataFrame, seconds: float) -> str:
        skipped = int((~summary["written"]).sum())
        current = f" ({skipped} already current, skipped)" if skipped else ""
        return (
            f"located the images of {int(summary['rows'].sum())} rows in {len(summary)} shards{current}, "
            f"{seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, locate, summarize)

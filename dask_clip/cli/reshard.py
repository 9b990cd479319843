"""``dask-clip reshard``: write the kept rows as new shards with new ids."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_new_folder_options,
    add_vector_layout_option,
    defaults,
    run_on_cluster,
)

if TYPE_CHECKING:
    import pandas as pd


NAME = "reshard"
HELP = "write kept rows as new shards with new ids"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.dataset import ImageTextPairDataset

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    add_new_folder_options(parser, "output", "the new shards", "reshard")
    options = defaults(ImageTextPairDataset.to_webdataset)
    parser.add_argument(
        "--filter-column", default=None, help="keep rows where this boolean column is True (default: all)"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=options["samples_per_shard"], help="rows per new shard"
    )
    parser.add_argument("--max-shards", type=int, default=options["max_shards"], help="digits of the new shard names")
    parser.add_argument("--old-id-col", default=None, help="column that keeps the old id (default: none)")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset import ImageTextPairDataset

    def reshard(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return dataset.to_webdataset(
            args.output,
            filter_column=args.filter_column,
            samples_per_shard=args.samples_per_shard,
            max_shards=args.max_shards,
            old_id_col=args.old_id_col,
            overwrite=args.overwrite,
            vector_layout=args.vector_layout,
        )

    def summarize(summary: pd.DataFrame, seconds: float) -> str:
        return (
            f"resharded into {len(summary)} shards: {int(summary['rows'].sum())} rows, "
            f"{int(summary['samples'].sum())} samples with members, {seconds:.1f}s; shards in {args.output}"
        )

    return run_on_cluster(args, reshard, summarize)

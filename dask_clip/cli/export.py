"""``dask-clip export``: write the embeddings in clip-retrieval's layout (``img_emb/``, ``metadata/``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_new_folder_options,
    run_on_cluster,
)

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset


NAME = "export"
HELP = "write embeddings in clip-retrieval's layout"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_new_folder_options(parser, "output", "img_emb/ and metadata/", "export")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    def export(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return dataset.export_clip_retrieval(args.output, overwrite=args.overwrite)

    def summarize(summary: pd.DataFrame, seconds: float) -> str:
        return (
            f"exported {len(summary)} shard pairs: {int(summary['rows'].sum())} embeddings, "
            f"{seconds:.1f}s; clip-retrieval layout in {args.output}"
        )

    return run_on_cluster(args, export, summarize)

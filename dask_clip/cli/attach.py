"""``dask-clip attach``: attach embeddings in clip-retrieval's layout (LAION's, or an export) to the rows."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_output_options,
    add_vector_layout_option,
    defaults,
    run_on_cluster,
    save,
)

if TYPE_CHECKING:
    import pandas as pd


NAME = "attach"
HELP = "attach embeddings in clip-retrieval's layout (LAION's, or an export) to the rows, and save"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.dataset import ImageTextPairDataset

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument("embeddings", help="folder with img_emb/img_emb_{i}.npy and metadata/metadata_{i}.parquet")
    parser.add_argument("--on", default=None, help="column to join on, e.g. url (default: the id column)")
    parser.add_argument(
        "--source-column",
        default=None,
        help="its name in the metadata parquets (default: the same; for the id column, key or image_path too)",
    )
    parser.add_argument(
        "--embedding-column",
        default=defaults(ImageTextPairDataset.attach_embeddings)["embedding_column"],
        help="column written",
    )
    add_output_options(parser, overwrite="attach again even where the saved vectors are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset import ImageTextPairDataset

    def attach(dataset: ImageTextPairDataset) -> tuple[ImageTextPairDataset, pd.DataFrame]:
        attached = dataset.attach_embeddings(
            args.embeddings, on=args.on, source_column=args.source_column, embedding_column=args.embedding_column
        )
        return attached, save(args, attached)

    def summarize(result: tuple[ImageTextPairDataset, pd.DataFrame], seconds: float) -> str:
        attached, summary = result
        rows, without = int(summary["rows"].sum()), int(summary["errors"].sum())
        joined = attached.provenance[args.embedding_column].operation
        return (
            f"attached {rows - without} vectors to {rows} rows of {len(summary)} shards ({without} without a vector), "
            f"joined on {joined['on']} = metadata's {joined['source_column']}, "
            f"{seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, attach, summarize)

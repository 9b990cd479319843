"""``dask-clip build-index``: an approximate nearest-neighbour index of the saved embeddings, for ``search``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_new_folder_options,
    defaults,
    run_on_cluster,
)

if TYPE_CHECKING:
    import pandas as pd


NAME = "build-index"
HELP = "build an approximate nearest-neighbour index of the saved embeddings for search --index"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.dataset import ImageTextPairDataset

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_new_folder_options(parser, "index", "the index", "build-index")
    options = defaults(ImageTextPairDataset.build_index)
    parser.add_argument("--embedding-column", default=options["embedding_column"], help="column to index")
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=options["memory_budget_gb"],
        help="largest index size: PQ codes instead of vectors above it",
    )
    parser.add_argument(
        "--index-key", default=None, help="a faiss factory string, e.g. IVF1024,Flat (default: chosen from the rows)"
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF lists a query scans (default: enough for ~16k vectors, at least 1%% of the lists)",
    )
    parser.add_argument("--seed", type=int, default=options["seed"], help="seed of the training sample and k-means")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset import ImageTextPairDataset

    def build(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return dataset.build_index(
            args.index,
            embedding_column=args.embedding_column,
            memory_budget_gb=args.memory_budget_gb,
            index_key=args.index_key,
            nprobe=args.nprobe,
            seed=args.seed,
            overwrite=args.overwrite,
        )

    def summarize(summary: pd.DataFrame, seconds: float) -> str:
        return (
            f"indexed {int(summary['indexed'].sum())} of {int(summary['rows'].sum())} rows of {len(summary)} shards "
            f"({int(summary['without_embedding'].sum())} without a usable embedding, not indexed), "
            f"{seconds:.1f}s; index in {args.index}"
        )

    return run_on_cluster(args, build, summarize)

"""``dask-clip dedup``: flag duplicate images (exact bytes, or SemDeDup on the embeddings) in a keep column."""

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
    save_counting_not_kept,
)

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset


NAME = "dedup"
HELP = "flag duplicate images (keep column) and save the metadata"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.ops.deduplicator import Deduplicator
    from dask_clip.ops.semantic_dedup import KEEP_POLICIES, SemanticDeduplicator

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument(
        "--method",
        choices=("exact", "semantic"),
        default="exact",
        help="exact: identical image bytes; semantic: SemDeDup on the saved embeddings",
    )
    parser.add_argument(
        "--keep-column",
        default=defaults(Deduplicator)["keep_column"],
        help="boolean column written: False for removed duplicates",
    )
    semantic = defaults(SemanticDeduplicator)
    parser.add_argument(
        "--eps", type=float, default=semantic["eps"], help="semantic: duplicates have cosine >= 1 - eps"
    )
    parser.add_argument("--n-clusters", type=int, default=semantic["n_clusters"], help="semantic: k-means clusters")
    parser.add_argument(
        "--which-to-keep",
        choices=KEEP_POLICIES,
        default=semantic["which_to_keep"],
        help="semantic: keep the item farthest from (hard) or closest to (easy) its centroid, or a random one",
    )
    parser.add_argument(
        "--seed", type=int, default=semantic["seed"], help="semantic: seed of k-means and of the random policy"
    )
    parser.add_argument(
        "--kmeans-sample-size",
        type=int,
        default=semantic["kmeans_sample_size"],
        help="semantic: embeddings the centroids are fitted on",
    )
    parser.add_argument(
        "--max-cluster-size",
        type=int,
        default=semantic["max_cluster_size"],
        help="semantic: clusters estimated to hold more rows are split (bounds a worker's memory); 0: never split",
    )
    parser.add_argument(
        "--max-copies",
        type=int,
        default=semantic["max_copies"],
        help="semantic: other clusters a row is also compared in, where it could have a duplicate; 0: its own only",
    )
    add_output_options(parser, overwrite="decide again even where the saved decisions are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.ops.deduplicator import Deduplicator
    from dask_clip.ops.exact_dedup import ExactDeduplicator
    from dask_clip.ops.semantic_dedup import SemanticDeduplicator

    if args.method == "exact":
        deduplicator: Deduplicator = ExactDeduplicator(keep_column=args.keep_column)
    else:
        deduplicator = SemanticDeduplicator(
            eps=args.eps,
            n_clusters=args.n_clusters,
            which_to_keep=args.which_to_keep,
            keep_column=args.keep_column,
            seed=args.seed,
            kmeans_sample_size=args.kmeans_sample_size,
            max_cluster_size=args.max_cluster_size or None,
            max_copies=args.max_copies,
        )

    def deduplicate(dataset: ImageTextPairDataset) -> tuple[pd.DataFrame, int]:
        return save_counting_not_kept(args, deduplicator(dataset))

    def summarize(result: tuple[pd.DataFrame, int], seconds: float) -> str:
        summary, removed = result
        return (
            f"dedup ({args.method}) over {len(summary)} shards: {int(summary['rows'].sum())} rows, "
            f"{removed} duplicates flagged ({args.keep_column}=False), {seconds:.1f}s; "
            f"parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, deduplicate, summarize)

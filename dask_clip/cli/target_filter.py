"""``dask-clip target-filter``: mark the rows whose image embeddings lie near a target set's (DataComp's image-based
filter) in ``near_target``, with ``target_similarity`` and ``target_cluster``."""

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


NAME = "target-filter"
HELP = "mark rows whose image embeddings lie near a target set's (DataComp's image-based filter)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.ops.near_target import MODES, NearTargetFilter

    near = defaults(NearTargetFilter)
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument(
        "--target",
        required=True,
        help="the target task's image embeddings: a .npy file (rows of vectors), or a dataset folder whose "
        "--target-column holds them (embedded by the model recorded for --embedding-column)",
    )
    parser.add_argument("--target-column", default=None, help="a dataset target's column (default: --embedding-column)")
    parser.add_argument("--embedding-column", default=near["embedding_column"], help="the dataset's image embeddings")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=near["mode"],
        help="centroids: k-means of the target, a row is near when its cosine to the nearest centroid is >= "
        "--threshold; pool (DataComp's rule): k-means of the dataset, a row is near when its cluster is the nearest "
        "one to some target embedding",
    )
    parser.add_argument(
        "--k", type=int, default=near["k"], help="clusters: of the target (centroids), of the dataset (pool)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="centroids: the cosine that counts as near")
    parser.add_argument("--seed", type=int, default=near["seed"], help="seed of k-means")
    parser.add_argument(
        "--kmeans-sample-size",
        type=int,
        default=near["kmeans_sample_size"],
        help="pool: dataset embeddings the clusters are fitted on",
    )
    add_output_options(parser, overwrite="decide again even where the saved decisions are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip import ImageTextPairDataset
    from dask_clip.ops.near_target import NearTargetFilter

    args.keep_column = defaults(NearTargetFilter)["near_column"]

    def filtered_and_saved(dataset: ImageTextPairDataset) -> tuple[pd.DataFrame, int]:
        target = args.target  # a dataset target's column is read on the cluster, when the filter is built
        if not target.endswith(".npy"):
            target = ImageTextPairDataset.from_webdataset(target, id_col=args.id_col)
        operation = NearTargetFilter(
            target,
            mode=args.mode,
            k=args.k,
            threshold=args.threshold,
            embedding_column=args.embedding_column,
            target_column=args.target_column,
            seed=args.seed,
            kmeans_sample_size=args.kmeans_sample_size,
        )
        return save_counting_not_kept(args, operation(dataset))  # the clusters are fitted here

    def summarize(result: tuple[pd.DataFrame, int], seconds: float) -> str:
        summary, not_near = result
        rows = int(summary["rows"].sum())
        return (
            f"target-filter ({args.mode}, k={args.k}) over {len(summary)} shards: {rows} rows, {rows - not_near} "
            f"near the target ({args.keep_column}=True), {seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, filtered_and_saved, summarize)

"""``dask-clip filter``: score rows (aesthetic, NSFW or CLIP score), or take a score column they have, and mark
those outside a range, or outside a top (or bottom) fraction, not kept."""

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
    open_dataset,
    run_on_cluster,
    save_counting_not_kept,
)

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset
    from dask_clip.ops.filters import ThresholdFilter
    from dask_clip.ops.top_fraction import TopFractionFilter


NAME = "filter"
HELP = "score rows (aesthetic, NSFW or CLIP score) and mark them kept by threshold or top fraction"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    score = parser.add_mutually_exclusive_group(required=True)
    score.add_argument(
        "--by",
        choices=("aesthetic", "nsfw", "clip-score"),
        help="aesthetic/nsfw: LAION classifier on the image embeddings; clip-score: image-caption cosine",
    )
    score.add_argument("--column", help="a numeric score column the dataset has already (saved, or another tool's)")
    parser.add_argument("--model-path", default=None, help="aesthetic/nsfw: local checkpoint file of the classifier")
    parser.add_argument(
        "--model-dir", default=None, help="clip-score: the CLIP (with tokenizer) that embedded the images"
    )
    parser.add_argument("--min", type=float, default=None, help="keep rows scoring at least this (default: no bound)")
    parser.add_argument("--max", type=float, default=None, help="keep rows scoring at most this (default: no bound)")
    parser.add_argument(
        "--top-fraction",
        type=float,
        default=None,
        help="instead of --min/--max: keep exactly ceil(F*n) of the n scored rows, the highest scores over every "
        "shard (ties by id); with --by, the scores are computed once to rank them and again to save them",
    )
    parser.add_argument("--smallest", action="store_true", help="--top-fraction keeps the lowest scores instead")
    parser.add_argument("--keep-missing", action="store_true", help="keep rows without a score (default: not kept)")
    parser.add_argument(
        "--keep-column",
        default=None,
        help="boolean column written (default: keep_by_threshold, or keep_top_fraction: the step's own); a column "
        "named here that exists is ANDed with, for --min/--max",
    )
    add_output_options(parser, overwrite="score again even where the saved scores are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip import UsageError

    if args.top_fraction is not None and (args.min is not None or args.max is not None):
        raise UsageError("give --top-fraction or --min/--max, not both")
    if args.top_fraction is None and args.smallest:
        raise UsageError("--smallest goes with --top-fraction")
    scored, column = scores(args, open_dataset(args))
    operation = decision(args, column)
    args.keep_column = operation.keep_column
    found: list[str] = []

    def filtered_and_saved(scored: ImageTextPairDataset) -> tuple[pd.DataFrame, int]:
        filtered = operation(scored)  # a top fraction ranks the scores now, on the cluster
        found.append(threshold_found(filtered, operation.keep_column))
        return save_counting_not_kept(args, filtered)

    def summarize(result: tuple[pd.DataFrame, int], seconds: float) -> str:
        summary, dropped = result
        return (
            f"filter by {column} over {len(summary)} shards: {int(summary['rows'].sum())} rows, {dropped} marked "
            f"{args.keep_column}=False{found[0]}, {seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, filtered_and_saved, summarize, scored)


def decision(args: argparse.Namespace, column: str) -> ThresholdFilter | TopFractionFilter:
    """The filter of ``column`` the options ask for (its arguments checked before anything is computed)."""
    from dask_clip.ops.filters import ThresholdFilter
    from dask_clip.ops.top_fraction import TopFractionFilter

    if args.top_fraction is None:
        return ThresholdFilter(
            column, min=args.min, max=args.max, keep_column=args.keep_column, keep_missing=args.keep_missing
        )
    options = {"largest": not args.smallest, "keep_missing": args.keep_missing}
    keep_column = args.keep_column or defaults(TopFractionFilter)["keep_column"]
    return TopFractionFilter(column, args.top_fraction, keep_column=keep_column, **options)


def threshold_found(dataset: ImageTextPairDataset, keep_column: str) -> str:
    """What a top fraction found (its recorded threshold and counts), to print; nothing for a threshold filter."""
    operation = dataset.operation_config(keep_column) or {}
    if "threshold" not in operation:
        return ""
    return (
        f" (threshold {operation['threshold']!r}: {operation['kept_rows']} of {operation['scored_rows']} "
        "scored rows kept)"
    )


def scores(args: argparse.Namespace, dataset: ImageTextPairDataset) -> tuple[ImageTextPairDataset, str]:
    """``dataset`` with the score ``--by`` names (or ``--column`` holds), and that score's column."""
    from dask_clip import AestheticClassifier, ClipTextEmbedder, NsfwClassifier, UsageError, clip_score

    if args.column is not None:
        return dataset, args.column
    if args.by == "clip-score":
        if not args.model_dir:
            raise UsageError(
                "--by clip-score needs --model-dir: the CLIP (with its tokenizer) that embedded the images"
            )
        return clip_score(ClipTextEmbedder(args.model_dir)(dataset)), "clip_score"
    if not args.model_path:
        raise UsageError(f"--by {args.by} needs --model-path: a local checkpoint of the classifier")
    classifier = AestheticClassifier(args.model_path) if args.by == "aesthetic" else NsfwClassifier(args.model_path)
    return classifier(dataset), classifier.pred_column

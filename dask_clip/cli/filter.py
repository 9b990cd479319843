"""``dask-clip filter``: score rows (aesthetic, NSFW or CLIP score) and mark those outside a range not kept."""

from __future__ import annotations

import argparse
from functools import partial
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


NAME = "filter"
HELP = "score rows (aesthetic, NSFW or CLIP score) and mark them kept by threshold"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.ops.filters import keep_by_threshold

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument(
        "--by",
        choices=("aesthetic", "nsfw", "clip-score"),
        required=True,
        help="aesthetic/nsfw: LAION classifier on the image embeddings; clip-score: image-caption cosine",
    )
    parser.add_argument("--model-path", default=None, help="aesthetic/nsfw: local checkpoint file of the classifier")
    parser.add_argument(
        "--model-dir", default=None, help="clip-score: the CLIP (with tokenizer) that embedded the images"
    )
    parser.add_argument("--min", type=float, default=None, help="keep rows scoring at least this (default: no bound)")
    parser.add_argument("--max", type=float, default=None, help="keep rows scoring at most this (default: no bound)")
    parser.add_argument(
        "--keep-column",
        default=defaults(keep_by_threshold)["keep_column"],
        help="boolean column written (ANDed with an existing one)",
    )
    add_output_options(parser, overwrite="score again even where the saved scores are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.ops.filters import keep_by_threshold

    scored, column = scores(args, open_dataset(args))
    filtered = keep_by_threshold(scored, column, min=args.min, max=args.max, keep_column=args.keep_column)

    def summarize(result: tuple[pd.DataFrame, int], seconds: float) -> str:
        summary, dropped = result
        return (
            f"filter by {column} over {len(summary)} shards: {int(summary['rows'].sum())} rows, {dropped} marked "
            f"{args.keep_column}=False, {seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, partial(save_counting_not_kept, args), summarize, filtered)


def scores(args: argparse.Namespace, dataset: ImageTextPairDataset) -> tuple[ImageTextPairDataset, str]:
    """``dataset`` with the score ``--by`` names, and that score's column."""
    from dask_clip import AestheticClassifier, ClipTextEmbedder, NsfwClassifier, UsageError, clip_score

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

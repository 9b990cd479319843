"""``dask-clip decontaminate``: flag the training rows whose image duplicates an item of an evaluation set."""

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


NAME = "decontaminate"
HELP = "flag rows whose image duplicates an evaluation image (cosine >= threshold) and save the metadata"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.ops.decontaminate import Decontaminator

    options = defaults(Decontaminator)
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument(
        "--against",
        required=True,
        help="the evaluation set: a folder of images, a dask_clip dataset's folder, or an embeddings file "
        "(NAME.npy with NAME.txt of item names, or a .parquet with name and embedding columns)",
    )
    parser.add_argument(
        "--threshold", type=float, required=True, help="flag rows with cosine >= this to an evaluation item"
    )
    parser.add_argument("--embedding-column", default=options["embedding_column"], help="the training embeddings")
    parser.add_argument(
        "--against-column", default=None, help="an evaluation dataset's embedding column (default: --embedding-column)"
    )
    parser.add_argument(
        "--index", default=None, help="search through this index folder (dask-clip build-index) instead of exactly"
    )
    parser.add_argument("--nprobe", type=int, default=None, help="--index: IVF lists scanned (default: the index's)")
    parser.add_argument(
        "--model-dir", default=None, help="images: the model recorded with the column (default: read from it)"
    )
    parser.add_argument("--device", default=options["device"], help="images: where the evaluation images are embedded")
    parser.add_argument("--drop-missing", action="store_true", help="rows without an embedding are not kept")
    parser.add_argument(
        "--keep-column", default=options["keep_column"], help="boolean column written: False if flagged"
    )
    add_output_options(parser, overwrite="decide again even where the saved decisions are current")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.ops.decontaminate import Decontaminator

    operation = Decontaminator(
        args.against,
        threshold=args.threshold,
        embedding_column=args.embedding_column,
        against_column=args.against_column,
        index=args.index,
        nprobe=args.nprobe,
        model_dir=args.model_dir,
        device=args.device,
        keep_missing=not args.drop_missing,
        keep_column=args.keep_column,
    )
    against: list[int] = []

    def decontaminated(dataset: ImageTextPairDataset) -> tuple[pd.DataFrame, int]:
        result = operation(dataset)  # the evaluation set is loaded (and embedded) now
        against.append((result.operation_config(args.keep_column) or {})["against"]["items"])
        return save_counting_not_kept(args, result)

    def summarize(result: tuple[pd.DataFrame, int], seconds: float) -> str:
        summary, flagged = result
        how = f"index {args.index}" if args.index else "exact search"
        return (
            f"decontaminate over {len(summary)} shards: {int(summary['rows'].sum())} rows, {flagged} flagged "
            f"({args.keep_column}=False) with cosine >= {args.threshold} to one of {against[0]} evaluation items "
            f"({how}), {seconds:.1f}s; parquet files in {args.output or args.path}"
        )

    return run_on_cluster(args, decontaminated, summarize)

"""``dask-clip search``: the top-k images by similarity to a text or an image."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import add_cluster_options, add_command, add_dataset_options, defaults, run_on_cluster

if TYPE_CHECKING:
    import pandas as pd


NAME = "search"
HELP = "top-k images by similarity to a text or an image"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.dataset import ImageTextPairDataset

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption to search for (needs the model's tokenizer)")
    query.add_argument("--image", help="an image file to search for")
    parser.add_argument("-k", type=int, default=defaults(ImageTextPairDataset.search)["k"], help="how many results")
    parser.add_argument(
        "--model-dir", default=None, help="model for the query (default: the one recorded with the embeddings)"
    )
    parser.add_argument("--index", default=None, help="folder of an index from build-index (default: exact search)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists to scan (default: the index's own)")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset import ImageTextPairDataset
    from dask_clip.dataset.search import read_image_query

    image = read_image_query(args.image) if args.image else None  # a path that names no file: before a cluster

    def search(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return dataset.search(
            text=args.text, image=image, k=args.k, model_dir=args.model_dir, index=args.index, nprobe=args.nprobe
        )

    return run_on_cluster(args, search, lambda hits, _seconds: hits.to_string(index=False))

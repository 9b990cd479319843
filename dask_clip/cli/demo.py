"""``dask-clip demo``: write sample shards from real photos and embed them, end to end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dask_clip.cli import embed
from dask_clip.cli.shared import EXIT_USAGE, add_cluster_options, add_command, run_on_cluster

DEMO_WORKERS = 2


NAME = "demo"
HELP = "write sample shards from real photos and embed them (on a local cluster by default)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    parser.add_argument(
        "--model-dir", default=embed.default_model(), help="hub id or save_pretrained folder of a CLIP model"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="use a small random-weight CLIP (a smoke run: meaningless embeddings)",
    )
    parser.add_argument("--output", default="demo_output", help="folder for the demo shards and model")
    add_cluster_options(parser, n_workers=DEMO_WORKERS)


def run(args: argparse.Namespace) -> int:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, ModelLoadError, embeddings_to_numpy, testing
    from dask_clip.execution import compute

    output = Path(args.output).resolve()
    model_dir = args.model_dir
    if args.random_weights:
        model_dir = str(testing.save_random_clip_model(output / "random-clip", shape="tiny"))
        print(f"random-weight CLIP saved in {model_dir}: THE EMBEDDINGS OF THIS RUN ARE MEANINGLESS (a smoke run)")
    try:
        embedder = ClipImageEmbedder(model_dir, batch_size=8)
    except ModelLoadError as error:
        print(
            f"dask-clip demo: the model {model_dir!r} is not available here ({str(error).splitlines()[0]}).\n"
            "Two ways out:\n"
            "  dask-clip demo --model-dir /path/to/clip   # a folder written by CLIPModel.save_pretrained\n"
            "  dask-clip demo --random-weights           # a smoke run with meaningless embeddings",
            file=sys.stderr,
        )
        return EXIT_USAGE
    shards = output / "shards"
    testing.make_img2dataset_shards(shards, shard_numbers=(0, 1, 2, 3), samples_per_shard=8)
    print(f"wrote 4 sample shards from scikit-image photos in {shards}")
    run_on_cluster(
        args,
        lambda dataset: embedder(dataset).save_metadata(overwrite=True),
        lambda summary, seconds: embed.summary_lines(summary, seconds, str(shards)),
        ImageTextPairDataset.from_webdataset(str(shards)),
    )
    result = compute(ImageTextPairDataset.from_webdataset(str(shards)).metadata)
    vectors = embeddings_to_numpy(result["image_embedding"])
    print(result[["key", "caption", "status", "embedding_error"]].to_string(max_colwidth=40))
    print(f"image_embedding: {vectors.shape[0]} rows x {vectors.shape[1]} float32 (NaN rows: no image)")
    if args.random_weights:
        print("reminder: random weights, so these embeddings are meaningless")
    return 0

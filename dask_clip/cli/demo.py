"""``dask-clip demo``: write sample shards from real photos, then embed, score and deduplicate them end to end, ready
for ``dask-clip serve``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dask_clip.cli import embed
from dask_clip.cli.shared import EXIT_USAGE, add_cluster_options, add_command, cluster

DEMO_WORKERS = 2
EPS = 0.05
"""Real weights: the README's near-duplicate threshold (cosine >= 0.95: crops and resizes)."""
RANDOM_WEIGHTS_EPS = 0.005
"""Random weights: each photo appears twice in the demo, cropped differently; under the random tiny CLIP those
pairs score >= 0.996 and distinct photos <= 0.994 (measured), so this removes one image of each of the 9 pairs
whose two images can be read (4 downloads failed, 4 were cut short), and nothing else."""


NAME = "demo"
HELP = "write sample shards from real photos, embed, score and deduplicate them (on a local cluster by default)"


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
    from dask_clip import (
        ClipImageEmbedder,
        ClipTextEmbedder,
        ImageTextPairDataset,
        ModelLoadError,
        SemanticDeduplicator,
        clip_score,
        embeddings_to_numpy,
        testing,
    )
    from dask_clip.execution import compute

    output = Path(args.output).resolve()
    model_dir = args.model_dir
    if args.random_weights:
        model_dir = str(testing.save_random_clip_model(output / "random-clip", shape="tiny"))
        testing.save_tokenizer_for_clip_model(model_dir)  # so that the caption embeddings and text search work
        print(f"random-weight CLIP saved in {model_dir}: THE EMBEDDINGS OF THIS RUN ARE MEANINGLESS (a smoke run)")
    try:
        embedder = ClipImageEmbedder(model_dir, batch_size=8)
        text_embedder = ClipTextEmbedder(model_dir)
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
    testing.make_img2dataset_shards(shards, shard_numbers=(0, 1, 2, 3), samples_per_shard=8, truncated_per_shard=1)
    print(f"wrote 4 sample shards from scikit-image photos in {shards} (8 downloads failed or cut short)")
    eps = RANDOM_WEIGHTS_EPS if args.random_weights else EPS
    with cluster(args):
        started = time.perf_counter()
        dataset = ImageTextPairDataset.from_webdataset(str(shards))
        summary = clip_score(text_embedder(embedder(dataset))).save_metadata(overwrite=True)
        print(embed.summary_lines(summary, time.perf_counter() - started, str(shards)))
        # SemDeDup reads the embeddings back from the files just written, so the images are embedded once
        deduplicator = SemanticDeduplicator(eps=eps, n_clusters=1)
        deduplicator(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata(overwrite=True)
        result = compute(ImageTextPairDataset.from_webdataset(str(shards)).metadata)
    vectors = embeddings_to_numpy(result["image_embedding"])
    columns = ["key", "caption", "status", "embedding_error", "clip_score", "keep", "similarity"]
    print(result[columns].to_string(max_colwidth=30))
    print(f"image_embedding: {vectors.shape[0]} rows x {vectors.shape[1]} float32 (NaN rows: no image)")
    print(
        f"clip_score: cosine of each image and its caption; SemDeDup (eps={eps}, similarity >= {1 - eps:g}) "
        f"removed {int((~result['keep'].astype(bool)).sum())} of {len(result)} rows (keep=False)"
    )
    if args.random_weights:
        print("reminder: random weights, so these embeddings are meaningless")
    print(f"see them in a browser: dask-clip serve {_as_typed(shards)}")
    return 0


def _as_typed(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it (as a user would type it), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

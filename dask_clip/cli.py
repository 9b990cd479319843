"""The ``dask-clip`` command: ``embed`` a folder of shards, or run the ``demo``.

Exit codes: 0 done, 1 the run failed, 2 bad arguments or no usable model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster-type", choices=("cpu", "gpu"), default="cpu", help="local cluster to start (default: cpu)")
    where.add_argument("--scheduler-address", help="connect to a running scheduler, e.g. tcp://host:8786")
    where.add_argument("--scheduler-file", help="connect to the scheduler described in this JSON file")
    parser.add_argument("--n-workers", type=int, default=None, help="workers of a local cluster (default: Dask's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-clip", description="CLIP image embeddings for WebDataset shards on Dask.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-shard progress")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed every image of a folder of shards")
    embed.add_argument("path", help="folder (local or fsspec URL) of NNNNN.tar + NNNNN.parquet shards")
    embed.add_argument("--model-dir", default=DEFAULT_MODEL, help=f"hub id or save_pretrained folder (default: {DEFAULT_MODEL})")
    embed.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32)")
    embed.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    embed.add_argument("--id-col", default="key", help="id column of the parquet files (default: key)")
    embed.add_argument("--no-autocast", action="store_true", help="run in float32 even where bf16 is fast")
    embed.add_argument("--overwrite", action="store_true", help="recompute shards whose output is already complete")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_cluster_options(embed)

    demo = commands.add_parser("demo", help="write sample shards from real photos and embed them on a local cluster")
    demo.add_argument("--model-dir", default=DEFAULT_MODEL, help=f"hub id or save_pretrained folder (default: {DEFAULT_MODEL})")
    demo.add_argument("--random-weights", action="store_true", help="use a small random-weight CLIP (a smoke run: meaningless embeddings)")
    demo.add_argument("--output", default="demo_output", help="folder for the demo shards and model (default: ./demo_output)")
    demo.add_argument("--n-workers", type=int, default=2, help="workers of the local cluster (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(_dask_log_level(args))
    from dask_clip.embedders.clip import ModelLoadError

    try:
        if args.command == "embed":
            return _embed(args)
        return _demo(args)
    except ModelLoadError as error:
        print(f"dask-clip: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, TimeoutError) as error:
        print(f"dask-clip: {error}", file=sys.stderr)
        return EXIT_FAILED


def _embed(args: argparse.Namespace) -> int:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, get_client

    embedder = ClipImageEmbedder(
        args.model_dir, model_inference_batch_size=args.batch_size, autocast=not args.no_autocast, verbose=args.verbose
    )
    local_options = {} if args.scheduler_address or args.scheduler_file else {"silence_logs": _dask_log_level(args)}
    client = get_client(
        args.cluster_type,
        scheduler_address=args.scheduler_address,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        **local_options,
    )
    with client:
        dataset = ImageTextPairDataset.from_webdataset(args.path, id_col=args.id_col)
        started = time.perf_counter()
        summary = embedder(dataset).save_metadata(args.output, overwrite=args.overwrite, progress=not args.no_progress)
        _print_summary(summary, time.perf_counter() - started, args.output or args.path)
    return 0


def _dask_log_level(args: argparse.Namespace) -> int:
    """Dask's own cluster logs are noise unless the user asked for verbose output."""
    return logging.INFO if args.verbose else logging.WARNING


def _print_summary(summary: "pd.DataFrame", seconds: float, output: str) -> None:
    rows, errors = int(summary["rows"].sum()), int(summary["errors"].sum())
    skipped = int((~summary["written"]).sum())
    resumed = f" ({skipped} already complete, skipped)" if skipped else ""
    computed = int(summary.loc[summary["written"], "rows"].sum() - summary.loc[summary["written"], "errors"].sum())
    print(
        f"embedded {len(summary)} shards{resumed}: {rows} rows, {rows - errors} with an embedding, {errors} without "
        f"(see embedding_error), {seconds:.1f}s ({computed / max(seconds, 1e-9):.1f} images/s); "
        f"parquet files in {output}"
    )


def _demo(args: argparse.Namespace) -> int:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, get_client, testing
    from dask_clip.embedders.clip import ModelLoadError

    output = Path(args.output).resolve()
    model_dir = args.model_dir
    if args.random_weights:
        model_dir = str(testing.save_random_clip_model(output / "random-clip", shape="tiny"))
        print(f"random-weight CLIP saved in {model_dir}: THE EMBEDDINGS OF THIS RUN ARE MEANINGLESS (a smoke run)")
    try:
        embedder = ClipImageEmbedder(model_dir, model_inference_batch_size=8)
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
    with get_client(
        "cpu", n_workers=args.n_workers, threads_per_worker=1, silence_logs=_dask_log_level(args)
    ) as client:
        print(f"local cluster started; dashboard: {client.dashboard_link}")
        dataset = ImageTextPairDataset.from_webdataset(str(shards))
        started = time.perf_counter()
        summary = embedder(dataset).save_metadata()
        _print_summary(summary, time.perf_counter() - started, str(shards))
    result = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    vectors = embeddings_to_numpy(result["image_embedding"])
    print(result[["key", "caption", "status", "embedding_error"]].to_string(max_colwidth=40))
    print(f"image_embedding: {vectors.shape[0]} rows x {vectors.shape[1]} float32 (NaN rows: no image)")
    if args.random_weights:
        print("reminder: random weights, so these embeddings are meaningless")
    return 0


if __name__ == "__main__":
    sys.exit(main())

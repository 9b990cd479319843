"""``dask-clip embed``: embed every image of a folder of shards and save the vectors with the metadata."""

from __future__ import annotations

import argparse
import posixpath
import re
from typing import TYPE_CHECKING

from dask_clip.cli.shared import (
    add_cluster_options,
    add_command,
    add_dataset_options,
    add_output_options,
    add_vector_layout_option,
    defaults,
    run_on_cluster,
    save,
)

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset

NAME = "embed"
HELP = "embed every image of a folder of shards"


def default_model() -> str:
    """The default ``--model-dir``: ``ClipImageEmbedder``'s."""
    from dask_clip.embedders.clip import ClipImageEmbedder

    return defaults(ClipImageEmbedder)["model_dir"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.embedders.clip import ENGINES
    from dask_clip.images.preprocess import DECODE_MODES

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_vector_layout_option(parser)
    parser.add_argument(
        "--model-dir",
        action="append",
        help="hub id or save_pretrained folder of a CLIP model; repeat it to run several models in one read of each "
        f"image (default: {default_model()})",
    )
    parser.add_argument(
        "--column",
        action="append",
        help="embedding column to write, once per --model-dir in the same order; reasons go to COLUMN_error "
        "(default: image_embedding and embedding_error for one model, image_embedding_<model folder name> for "
        "several)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument("--no-autocast", action="store_true", help="run in float32 even where bf16 is fast")
    parser.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default=None,
        help="fast: reduced-size JPEG decode + torch resize; exact: as transformers' processor; "
        "device: JPEGs decoded in batches on the GPU (nvJPEG, needs the gpu extra) "
        "(default: exact with --no-autocast, else fast)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="openvino: CPU workers, converted once per machine (needs the openvino extra); recorded as a property of "
        "the column, not its identity",
    )
    parser.add_argument("--int8", action="store_true", help="with --engine openvino: int8 weights (another column)")
    add_output_options(parser, overwrite="recompute shards whose output is already complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.embedders.clip import ClipImageEmbedder
    from dask_clip.embedders.multi import MultiEmbedder, own_error_column

    models = args.model_dir or [default_model()]
    embedders = [
        ClipImageEmbedder(
            model,
            embedding_column=column,
            error_column=own_error_column(column),
            batch_size=args.batch_size,
            autocast=not args.no_autocast,
            verbose=args.verbose,
            decode_mode=args.decode_mode,
            engine=args.engine,
            precision="int8" if args.int8 else None,
        )
        for model, column in zip(models, embedding_columns(models, args.column), strict=True)
    ]
    embedder = embedders[0] if len(embedders) == 1 else MultiEmbedder(embedders)
    reason_columns = ", ".join(embedder.reasons().values())

    def embed(dataset: ImageTextPairDataset) -> pd.DataFrame:
        return save(args, embedder(dataset), progress=not args.no_progress)

    return run_on_cluster(
        args, embed, lambda summary, seconds: summary_lines(summary, seconds, args.output or args.path, reason_columns)
    )


def embedding_columns(models: list[str], columns: list[str] | None) -> list[str]:
    """The embedding column of each of ``models``: ``columns`` (one per model, in order), else ``image_embedding``
    for one model and ``image_embedding_<its folder or hub name>`` for each of several."""
    from dask_clip.embedders.base import DEFAULT_EMBEDDING_COLUMN
    from dask_clip.errors import UsageError

    if columns is None:
        if len(models) == 1:
            return [DEFAULT_EMBEDDING_COLUMN]
        names = [
            re.sub(r"[^0-9a-z]+", "_", posixpath.basename(model.rstrip("/")).lower()).strip("_") for model in models
        ]
        return [f"{DEFAULT_EMBEDDING_COLUMN}_{name}" for name in names]
    if len(columns) != len(models):
        raise UsageError(
            f"{len(models)} --model-dir but {len(columns)} --column: give one --column per --model-dir, in the same "
            f"order (models: {models}; columns: {columns})"
        )
    return columns


def summary_lines(summary: pd.DataFrame, seconds: float, output: str, reason_columns: str = "embedding_error") -> str:
    """What an embedding run did (a ``save_metadata`` summary, ``seconds`` long): rows with and without an
    embedding (their reasons in ``reason_columns``), the rate, where the files are, and the seconds each stage
    took over the shards written."""
    rows, errors = int(summary["rows"].sum()), int(summary["errors"].sum())
    skipped = int((~summary["written"]).sum())
    resumed = f" ({skipped} already complete, skipped)" if skipped else ""
    written = summary["written"]
    computed = int(summary.loc[written, "rows"].sum() - summary.loc[written, "errors"].sum())
    lines = [
        f"embedded {len(summary)} shards{resumed}: {rows} rows, {rows - errors} with an embedding, {errors} without "
        f"(see {reason_columns}), {seconds:.1f}s ({computed / max(seconds, 1e-9):.1f} images/s); "
        f"parquet files in {output}"
    ]
    stages = summary.loc[written, ["load_s", "wait_s", "decode_s", "infer_s", "write_s"]].sum()
    if written.any():
        lines.append(
            "seconds summed over the shards written: "
            + ", ".join(f"{name[:-2]} {value:.1f}" for name, value in stages.items())
        )
    return "\n".join(lines)

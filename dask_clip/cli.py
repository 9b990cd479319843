"""The ``dask-clip`` command: one subcommand per public operation.

Every subcommand that computes takes the same cluster options (``--cluster-type``,
``--scheduler-address``, ``--scheduler-file``, ``--n-workers``) and ends with a one-line summary.
Exit codes follow the error classes (``dask_clip.errors``): 0 done; 1 the run failed on the data
(``DataError``: the message names the shard or file) or the cluster; 2 bad arguments, a missing
dependency or a model that cannot be loaded (``ConfigurationError``). The cause is printed once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dask_clip.errors import ConfigurationError, DaskClipError
from dask_clip.images.preprocess import DECODE_MODES
from dask_clip.io.vectors import DEFAULT_LAYOUT, LAYOUTS

if TYPE_CHECKING:
    import pandas as pd

    from dask_clip.dataset import ImageTextPairDataset

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
EXIT_FAILED = 1
EXIT_USAGE = 2


# --- arguments ------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with its default, once: not where the help already says it (``(default: one
    per core)`` says more than ``None``), nor where there is none to show (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster-type", choices=("cpu", "gpu"), default="cpu", help="local cluster to start (default: cpu)"
    )
    where.add_argument(
        "--scheduler-address", help="connect to a running scheduler, e.g. tcp://host:8786 (default: none)"
    )
    where.add_argument("--scheduler-file", help="connect to the scheduler described in this JSON file (default: none)")
    parser.add_argument(
        "--n-workers", type=int, default=None, help="workers of a local cluster (default: one per core)"
    )


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="folder (local or fsspec URL) of NNNNN.tar + NNNNN.parquet shards")
    parser.add_argument("--id-col", default="key", help="id column of the parquet files (default: key)")


def _add_vector_layout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vector-layout",
        choices=LAYOUTS,
        default=DEFAULT_LAYOUT,
        help="how the parquet files hold embeddings: list<float32> with the width in the footer (every reader opens "
        "it), fixed_size_list<float32>[D] (LanceDB, HF List(length=D); null rows need pyarrow>=26) or float16 "
        "(list<halffloat>, half the size)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dask-clip",
        description="CLIP image embeddings and curation for WebDataset shards, on Dask.",
        epilog="exit codes: 0 done, 1 the run failed, 2 bad arguments or no usable model",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-shard progress and Dask's own logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = _HelpFormatter

    embed = commands.add_parser("embed", help="embed every image of a folder of shards", formatter_class=defaults)
    _add_dataset_options(embed)
    _add_vector_layout_option(embed)
    embed.add_argument("--model-dir", default=DEFAULT_MODEL, help="hub id or save_pretrained folder of a CLIP model")
    embed.add_argument("--batch-size", type=int, default=32, help="images per model call")
    embed.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    embed.add_argument("--no-autocast", action="store_true", help="run in float32 even where bf16 is fast")
    embed.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default=None,
        help="fast: reduced-size JPEG decode + torch resize; exact: as transformers' processor; "
        "device: JPEGs decoded in batches on the GPU (nvJPEG, needs the gpu extra) "
        "(default: exact with --no-autocast, else fast)",
    )
    embed.add_argument("--overwrite", action="store_true", help="recompute shards whose output is already complete")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_cluster_options(embed)

    dedup = commands.add_parser(
        "dedup", help="flag duplicate images (keep column) and save the metadata", formatter_class=defaults
    )
    _add_dataset_options(dedup)
    _add_vector_layout_option(dedup)
    dedup.add_argument(
        "--method",
        choices=("exact", "semantic"),
        default="exact",
        help="exact: identical image bytes; semantic: SemDeDup on the saved embeddings",
    )
    dedup.add_argument("--keep-column", default="keep", help="boolean column written: False for removed duplicates")
    dedup.add_argument("--eps", type=float, default=0.01, help="semantic: duplicates have cosine >= 1 - eps")
    dedup.add_argument("--n-clusters", type=int, default=1000, help="semantic: k-means clusters")
    dedup.add_argument(
        "--which-to-keep",
        choices=("hard", "easy", "random"),
        default="hard",
        help="semantic: keep the item farthest from (hard) or closest to (easy) its centroid, or a random one",
    )
    dedup.add_argument("--seed", type=int, default=0, help="semantic: seed of k-means and of the random policy")
    dedup.add_argument(
        "--kmeans-sample-size", type=int, default=100_000, help="semantic: embeddings the centroids are fitted on"
    )
    dedup.add_argument(
        "--max-cluster-size",
        type=int,
        default=100_000,
        help="semantic: clusters estimated to hold more rows are split (bounds a worker's memory); 0: never split",
    )
    dedup.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    dedup.add_argument(
        "--overwrite", action="store_true", help="decide again even where the saved decisions are current"
    )
    _add_cluster_options(dedup)

    filter_ = commands.add_parser(
        "filter",
        help="score rows (aesthetic, NSFW or CLIP score) and mark them kept by threshold",
        formatter_class=defaults,
    )
    _add_dataset_options(filter_)
    _add_vector_layout_option(filter_)
    filter_.add_argument(
        "--by",
        choices=("aesthetic", "nsfw", "clip-score"),
        required=True,
        help="aesthetic/nsfw: LAION classifier on the image embeddings; clip-score: image-caption cosine",
    )
    filter_.add_argument("--model-path", default=None, help="aesthetic/nsfw: local checkpoint file of the classifier")
    filter_.add_argument(
        "--model-dir", default=None, help="clip-score: the CLIP (with tokenizer) that embedded the images"
    )
    filter_.add_argument("--min", type=float, default=None, help="keep rows scoring at least this (default: no bound)")
    filter_.add_argument("--max", type=float, default=None, help="keep rows scoring at most this (default: no bound)")
    filter_.add_argument("--keep-column", default="keep", help="boolean column written (ANDed with an existing one)")
    filter_.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    filter_.add_argument("--overwrite", action="store_true", help="score again even where the saved scores are current")
    _add_cluster_options(filter_)

    reshard = commands.add_parser(
        "reshard", help="write kept rows as new shards with new ids", formatter_class=defaults
    )
    _add_dataset_options(reshard)
    _add_vector_layout_option(reshard)
    reshard.add_argument("output", help="folder for the new shards (must be empty, or see --overwrite)")
    reshard.add_argument(
        "--overwrite", action="store_true", help="replace the output folder if an earlier reshard wrote all it holds"
    )
    reshard.add_argument(
        "--filter-column", default=None, help="keep rows where this boolean column is True (default: all)"
    )
    reshard.add_argument("--samples-per-shard", type=int, default=10_000, help="rows per new shard")
    reshard.add_argument("--max-shards", type=int, default=5, help="digits of the new shard names")
    reshard.add_argument("--old-id-col", default=None, help="column that keeps the old id (default: none)")
    _add_cluster_options(reshard)

    search = commands.add_parser(
        "search", help="top-k images by similarity to a text or an image", formatter_class=defaults
    )
    _add_dataset_options(search)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption to search for (needs the model's tokenizer)")
    query.add_argument("--image", help="an image file to search for")
    search.add_argument("-k", type=int, default=10, help="how many results")
    search.add_argument(
        "--model-dir", default=None, help="model for the query (default: the one recorded with the embeddings)"
    )
    search.add_argument("--index", default=None, help="folder of an index from build-index (default: exact search)")
    search.add_argument("--nprobe", type=int, default=None, help="IVF lists to scan (default: the index's own)")
    _add_cluster_options(search)

    build_index = commands.add_parser(
        "build-index",
        help="build an approximate nearest-neighbour index of the saved embeddings for search --index",
        formatter_class=defaults,
    )
    _add_dataset_options(build_index)
    build_index.add_argument("index", help="folder for the index (must be empty, or see --overwrite)")
    build_index.add_argument("--embedding-column", default="image_embedding", help="column to index")
    build_index.add_argument(
        "--memory-budget-gb", type=float, default=4.0, help="largest index size: PQ codes instead of vectors above it"
    )
    build_index.add_argument(
        "--index-key", default=None, help="a faiss factory string, e.g. IVF1024,Flat (default: chosen from the rows)"
    )
    build_index.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists a query scans (default: enough for ~16k vectors)"
    )
    build_index.add_argument("--seed", type=int, default=0, help="seed of the training sample and k-means")
    build_index.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the index folder if an earlier build-index wrote all it holds",
    )
    _add_cluster_options(build_index)

    export = commands.add_parser("export", help="write embeddings in clip-retrieval's layout", formatter_class=defaults)
    _add_dataset_options(export)
    export.add_argument("output", help="folder for img_emb/ and metadata/ (must be empty, or see --overwrite)")
    export.add_argument(
        "--overwrite", action="store_true", help="replace the output folder if an earlier export wrote all it holds"
    )
    _add_cluster_options(export)

    attach = commands.add_parser(
        "attach",
        help="attach embeddings in clip-retrieval's layout (LAION's, or an export) to the rows, and save",
        formatter_class=defaults,
    )
    _add_dataset_options(attach)
    _add_vector_layout_option(attach)
    attach.add_argument("embeddings", help="folder with img_emb/img_emb_{i}.npy and metadata/metadata_{i}.parquet")
    attach.add_argument("--on", default=None, help="column to join on, e.g. url (default: the id column)")
    attach.add_argument(
        "--source-column",
        default=None,
        help="its name in the metadata parquets (default: the same; for the id column, key or image_path too)",
    )
    attach.add_argument("--embedding-column", default="image_embedding", help="column written")
    attach.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    attach.add_argument(
        "--overwrite", action="store_true", help="attach again even where the saved vectors are current"
    )
    _add_cluster_options(attach)

    info = commands.add_parser(
        "info",
        help="which configuration produced each derived column, in how many shards, and which shards disagree",
        formatter_class=defaults,
    )
    _add_dataset_options(info)
    _add_cluster_options(info)

    demo = commands.add_parser(
        "demo", help="write sample shards from real photos and embed them on a local cluster", formatter_class=defaults
    )
    demo.add_argument("--model-dir", default=DEFAULT_MODEL, help="hub id or save_pretrained folder of a CLIP model")
    demo.add_argument(
        "--random-weights",
        action="store_true",
        help="use a small random-weight CLIP (a smoke run: meaningless embeddings)",
    )
    demo.add_argument("--output", default="demo_output", help="folder for the demo shards and model")
    demo.add_argument("--n-workers", type=int, default=2, help="workers of the local cluster")
    return parser


# --- running ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import distributed  # noqa: F401 - it sets its loggers' levels when first imported: import it before ours

    logging.getLogger("distributed").setLevel(_dask_log_level(args))
    command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return command(args)
    except DaskClipError as error:
        print(f"dask-clip {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigurationError) else EXIT_FAILED
    except (OSError, TimeoutError) as error:  # the cluster: a scheduler that cannot be reached, a lost worker
        print(f"dask-clip {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


def _dask_log_level(args: argparse.Namespace) -> int:
    """Dask's own logs are noise unless the user asked for verbose output: a failing task is reported once,
    by this command, not again by every worker that ran it."""
    return logging.INFO if args.verbose else logging.CRITICAL


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """A client for the cluster the options name; a local cluster's dashboard is printed on stderr."""
    from dask_clip import get_client

    remote = args.scheduler_address or args.scheduler_file
    options = {} if remote else {"silence_logs": _dask_log_level(args)}
    with get_client(
        args.cluster_type,
        scheduler_address=args.scheduler_address,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        **options,
    ) as client:
        if not remote:
            print(f"local {args.cluster_type} cluster started; dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


def _dataset(args: argparse.Namespace) -> ImageTextPairDataset:
    from dask_clip import ImageTextPairDataset

    return ImageTextPairDataset.from_webdataset(args.path, id_col=args.id_col)


def _embed(args: argparse.Namespace) -> int:
    from dask_clip import ClipImageEmbedder

    embedder = ClipImageEmbedder(
        args.model_dir,
        batch_size=args.batch_size,
        autocast=not args.no_autocast,
        verbose=args.verbose,
        decode_mode=args.decode_mode,
    )
    dataset = _dataset(args)  # the listing and the first footer, on this machine: fails before a cluster starts
    with _cluster(args):
        started = time.perf_counter()
        summary = embedder(dataset).save_metadata(
            args.output, overwrite=args.overwrite, vector_layout=args.vector_layout, progress=not args.no_progress
        )
        _print_embed_summary(summary, time.perf_counter() - started, args.output or args.path)
    return 0


def _print_embed_summary(summary: pd.DataFrame, seconds: float, output: str) -> None:
    rows, errors = int(summary["rows"].sum()), int(summary["errors"].sum())
    skipped = int((~summary["written"]).sum())
    resumed = f" ({skipped} already complete, skipped)" if skipped else ""
    written = summary["written"]
    computed = int(summary.loc[written, "rows"].sum() - summary.loc[written, "errors"].sum())
    print(
        f"embedded {len(summary)} shards{resumed}: {rows} rows, {rows - errors} with an embedding, {errors} without "
        f"(see embedding_error), {seconds:.1f}s ({computed / max(seconds, 1e-9):.1f} images/s); "
        f"parquet files in {output}"
    )
    stages = summary.loc[written, ["load_s", "wait_s", "decode_s", "infer_s", "write_s"]].sum()
    if written.any():
        print(
            "seconds summed over the shards written: "
            + ", ".join(f"{name[:-2]} {value:.1f}" for name, value in stages.items())
        )


def _dedup(args: argparse.Namespace) -> int:
    from dask_clip import ExactDeduplicator, SemanticDeduplicator

    if args.method == "exact":
        deduplicator: Any = ExactDeduplicator(keep_column=args.keep_column)
    else:
        deduplicator = SemanticDeduplicator(
            eps=args.eps,
            n_clusters=args.n_clusters,
            which_to_keep=args.which_to_keep,
            keep_column=args.keep_column,
            seed=args.seed,
            kmeans_sample_size=args.kmeans_sample_size,
            max_cluster_size=args.max_cluster_size or None,
        )
    dataset = _dataset(args)
    with _cluster(args):
        started = time.perf_counter()
        summary = deduplicator(dataset).save_metadata(
            args.output, overwrite=args.overwrite, vector_layout=args.vector_layout
        )
        removed = _count_not_kept(summary, args.keep_column)
    print(
        f"dedup ({args.method}) over {len(summary)} shards: {int(summary['rows'].sum())} rows, {removed} duplicates "
        f"flagged ({args.keep_column}=False), {time.perf_counter() - started:.1f}s; "
        f"parquet files in {args.output or args.path}"
    )
    return 0


def _count_not_kept(summary: pd.DataFrame, keep_column: str) -> int:
    """Rows whose ``keep_column`` is False in the parquet files a ``save_metadata`` summary lists."""
    import dask.dataframe as dd

    kept = dd.read_parquet(summary["path"].tolist(), columns=[keep_column])[keep_column]
    return int((~kept.astype(bool)).sum().compute())


def _filter(args: argparse.Namespace) -> int:
    from dask_clip import (
        AestheticClassifier,
        ClipTextEmbedder,
        NsfwClassifier,
        UsageError,
        clip_score,
        keep_by_threshold,
    )

    dataset = _dataset(args)
    if args.by == "clip-score":
        if not args.model_dir:
            raise UsageError(
                "--by clip-score needs --model-dir: the CLIP (with its tokenizer) that embedded the images"
            )
        scored, column = clip_score(ClipTextEmbedder(args.model_dir)(dataset)), "clip_score"
    else:
        if not args.model_path:
            raise UsageError(f"--by {args.by} needs --model-path: a local checkpoint of the classifier")
        classifier = AestheticClassifier(args.model_path) if args.by == "aesthetic" else NsfwClassifier(args.model_path)
        scored, column = classifier(dataset), classifier.pred_column
    filtered = keep_by_threshold(scored, column, min=args.min, max=args.max, keep_column=args.keep_column)
    with _cluster(args):
        started = time.perf_counter()
        summary = filtered.save_metadata(args.output, overwrite=args.overwrite, vector_layout=args.vector_layout)
        dropped = _count_not_kept(summary, args.keep_column)
    print(
        f"filter by {column} over {len(summary)} shards: {int(summary['rows'].sum())} rows, {dropped} marked "
        f"{args.keep_column}=False, {time.perf_counter() - started:.1f}s; parquet files in {args.output or args.path}"
    )
    return 0


def _reshard(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    with _cluster(args):
        started = time.perf_counter()
        summary = dataset.to_webdataset(
            args.output,
            filter_column=args.filter_column,
            samples_per_shard=args.samples_per_shard,
            max_shards=args.max_shards,
            old_id_col=args.old_id_col,
            overwrite=args.overwrite,
            vector_layout=args.vector_layout,
        )
    print(
        f"resharded into {len(summary)} shards: {int(summary['rows'].sum())} rows, {int(summary['samples'].sum())} "
        f"samples with members, {time.perf_counter() - started:.1f}s; shards in {args.output}"
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    from dask_clip.dataset.search import read_image_query

    image = read_image_query(args.image) if args.image else None  # a path that names no file: before a cluster
    dataset = _dataset(args)
    with _cluster(args):
        hits = dataset.search(
            text=args.text, image=image, k=args.k, model_dir=args.model_dir, index=args.index, nprobe=args.nprobe
        )
    print(hits.to_string(index=False))
    return 0


def _build_index(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    with _cluster(args):
        started = time.perf_counter()
        summary = dataset.build_index(
            args.index,
            embedding_column=args.embedding_column,
            memory_budget_gb=args.memory_budget_gb,
            index_key=args.index_key,
            nprobe=args.nprobe,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(
        f"indexed {int(summary['indexed'].sum())} of {int(summary['rows'].sum())} rows of {len(summary)} shards "
        f"({int(summary['without_embedding'].sum())} without a usable embedding, not indexed), "
        f"{time.perf_counter() - started:.1f}s; index in {args.index}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    with _cluster(args):
        started = time.perf_counter()
        summary = dataset.export_clip_retrieval(args.output, overwrite=args.overwrite)
    print(
        f"exported {len(summary)} shard pairs: {int(summary['rows'].sum())} embeddings, "
        f"{time.perf_counter() - started:.1f}s; clip-retrieval layout in {args.output}"
    )
    return 0


def _attach(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    with _cluster(args):
        started = time.perf_counter()
        attached = dataset.attach_embeddings(
            args.embeddings, on=args.on, source_column=args.source_column, embedding_column=args.embedding_column
        )
        summary = attached.save_metadata(args.output, overwrite=args.overwrite, vector_layout=args.vector_layout)
    rows, without = int(summary["rows"].sum()), int(summary["errors"].sum())
    joined = attached.provenance[args.embedding_column].operation
    print(
        f"attached {rows - without} vectors to {rows} rows of {len(summary)} shards ({without} without a vector), "
        f"joined on {joined['on']} = metadata's {joined['source_column']}, "
        f"{time.perf_counter() - started:.1f}s; parquet files in {args.output or args.path}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from dask_clip.io.provenance import describe_operation

    dataset = _dataset(args)
    with _cluster(args):
        table = dataset.info()
    print(f"{args.path}: {len(dataset.shards)} shards")
    if table.empty:
        print("no derived columns recorded")
    for column, group in table.groupby("column", sort=False):
        mixed = " (produced differently in different shards)" if len(group) > 1 else ""
        print(f"{column}{mixed}")
        for row in group.itertuples():
            stems = ", ".join(row.stems[:5]) + (f" and {len(row.stems) - 5} more" if len(row.stems) > 5 else "")
            print(f"  {describe_operation(row.operation)}")
            print(
                f"    {row.shards} shards ({stems}): {row.rows} rows, {row.with_value} with a value, "
                f"{row.with_reason} with a reason, {row.missing} with neither; {row.stale} stale"
            )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, ModelLoadError, embeddings_to_numpy, testing

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
    args.cluster_type, args.scheduler_address, args.scheduler_file = "cpu", None, None
    with _cluster(args):
        started = time.perf_counter()
        summary = embedder(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata(overwrite=True)
        _print_embed_summary(summary, time.perf_counter() - started, str(shards))
    result = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    vectors = embeddings_to_numpy(result["image_embedding"])
    print(result[["key", "caption", "status", "embedding_error"]].to_string(max_colwidth=40))
    print(f"image_embedding: {vectors.shape[0]} rows x {vectors.shape[1]} float32 (NaN rows: no image)")
    if args.random_weights:
        print("reminder: random weights, so these embeddings are meaningless")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "embed": _embed,
    "dedup": _dedup,
    "filter": _filter,
    "reshard": _reshard,
    "search": _search,
    "build-index": _build_index,
    "export": _export,
    "info": _info,
    "attach": _attach,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())

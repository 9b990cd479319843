"""What the commands share: their common options, declared once, and their skeleton (open the dataset,
connect to the cluster, time the work, print its summary)."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from dask_clip.io.vectors import DEFAULT_LAYOUT, LAYOUTS

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

    from dask_clip.dataset import ImageTextPairDataset

EXIT_FAILED = 1
EXIT_USAGE = 2

Result = TypeVar("Result")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with its default, once: not where the help already says it (``(default: one
    per core)`` says more than ``None``), nor where there is none to show (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """The defaults of ``function``'s parameters by name (of ``__init__`` for a class): the options that
    configure it show and use the same ones."""
    parameters = inspect.signature(function).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters if parameter.default is not parameter.empty}


# --- options -------------------------------------------------------------------------------------------
def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A subcommand ``name`` whose arguments ``run`` is called with."""
    parser = subparsers.add_parser(name, help=help, formatter_class=HelpFormatter)
    parser.set_defaults(run=run)
    return parser


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    from dask_clip.dataset import ImageTextPairDataset

    parser.add_argument("path", help="folder (local or fsspec URL) of NNNNN.tar + NNNNN.parquet shards")
    parser.add_argument(
        "--id-col",
        default=defaults(ImageTextPairDataset.from_webdataset)["id_col"],
        help="id column of the parquet files",
    )


def add_vector_layout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vector-layout",
        choices=LAYOUTS,
        default=DEFAULT_LAYOUT,
        help="how the parquet files hold embeddings: list<float32> with the width in the footer (every reader opens "
        "it), fixed_size_list<float32>[D] (LanceDB, HF List(length=D); null rows need pyarrow>=26) or float16 "
        "(list<halffloat>, half the size)",
    )


def add_output_options(parser: argparse.ArgumentParser, overwrite: str) -> None:
    """``--output`` for commands that save the metadata (next to the shards by default), and ``--overwrite``,
    whose help says what it makes the command do again."""
    parser.add_argument("--output", default=None, help="folder for the parquet files (default: next to the shards)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite)


def add_new_folder_options(parser: argparse.ArgumentParser, name: str, contents: str, command: str) -> None:
    """A positional ``name``: the folder ``command`` writes ``contents`` into, which must be empty unless
    ``--overwrite`` is given and an earlier run of ``command`` wrote all it holds."""
    parser.add_argument(name, help=f"folder for {contents} (must be empty, or see --overwrite)")
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace the {name} folder if an earlier {command} wrote all it holds"
    )


def add_cluster_options(parser: argparse.ArgumentParser, n_workers: int | None = None) -> None:
    """Where the command computes: a local cluster of ``--cluster-type`` (of ``n_workers`` workers unless
    ``--n-workers`` says otherwise; None: one per core), or a running one."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster-type", choices=("cpu", "gpu"), default="cpu", help="local cluster to start (default: cpu)"
    )
    where.add_argument(
        "--scheduler-address", help="connect to a running scheduler, e.g. tcp://host:8786 (default: none)"
    )
    where.add_argument("--scheduler-file", help="connect to the scheduler described in this JSON file (default: none)")
    per_core = " (default: one per core)" if n_workers is None else ""
    parser.add_argument("--n-workers", type=int, default=n_workers, help=f"workers of a local cluster{per_core}")


# --- running -------------------------------------------------------------------------------------------
def dask_log_level(args: argparse.Namespace) -> int:
    """Dask's own logs are noise unless the user asked for verbose output: a failing task is reported once,
    by this command, not again by every worker that ran it."""
    return logging.INFO if args.verbose else logging.CRITICAL


@contextlib.contextmanager
def cluster(args: argparse.Namespace) -> Iterator[Client]:
    """A client for the cluster the options name; a local cluster's dashboard is printed on stderr.

    A client this process already holds to ``--scheduler-address`` (``main`` called from Python) is used as
    it is and left open."""
    from dask_clip.distributed.client import current_client, get_client

    held = current_client()
    if held is not None and args.scheduler_address is not None and held.scheduler.address == args.scheduler_address:
        yield held
        return
    remote = args.scheduler_address or args.scheduler_file
    options = {} if remote else {"silence_logs": dask_log_level(args)}
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


def open_dataset(args: argparse.Namespace) -> ImageTextPairDataset:
    """The dataset at ``args.path``: the listing and the first footer are read here, before any cluster starts."""
    from dask_clip import ImageTextPairDataset

    return ImageTextPairDataset.from_webdataset(args.path, id_col=args.id_col)


def run_on_cluster(
    args: argparse.Namespace,
    compute: Callable[[ImageTextPairDataset], Result],
    summarize: Callable[[Result, float], str],
    dataset: ImageTextPairDataset | None = None,
) -> int:
    """Open the dataset (unless given), then on the cluster ``compute`` it and print ``summarize(result,
    seconds computing)``; exit code 0."""
    dataset = open_dataset(args) if dataset is None else dataset
    with cluster(args):
        started = time.perf_counter()
        result = compute(dataset)
        print(summarize(result, time.perf_counter() - started))
    return 0


def save(args: argparse.Namespace, dataset: ImageTextPairDataset, **options: Any) -> pd.DataFrame:
    """``dataset.save_metadata`` where the output options say (``--output``, ``--overwrite``, ``--vector-layout``);
    its summary, one row per shard."""
    return dataset.save_metadata(args.output, overwrite=args.overwrite, vector_layout=args.vector_layout, **options)


def save_counting_not_kept(args: argparse.Namespace, dataset: ImageTextPairDataset) -> tuple[pd.DataFrame, int]:
    """``save``, then count the rows whose ``--keep-column`` is False in the files written."""
    import dask.dataframe as dd

    from dask_clip.execution import compute

    summary = save(args, dataset)
    kept = dd.read_parquet(summary["path"].tolist(), columns=[args.keep_column])[args.keep_column]
    return summary, int(compute((~kept.astype(bool)).sum()))

"""``dask-clip info``: which configuration produced each derived column, in how many shards, and which disagree."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import add_cluster_options, add_command, add_dataset_options, run_on_cluster

if TYPE_CHECKING:
    import pandas as pd

SHARDS_NAMED = 5
"""Shards a configuration lists by name; the others are counted."""


NAME = "info"
HELP = "which configuration produced each derived column, in how many shards, and which shards disagree"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    def summarize(result: tuple[int, pd.DataFrame], _seconds: float) -> str:
        shards, table = result
        return "\n".join([f"{args.path}: {shards} shards", *describe(table)])

    return run_on_cluster(args, lambda dataset: (len(dataset.shards), dataset.info()), summarize)


def describe(table: pd.DataFrame) -> list[str]:
    """Lines for ``dataset.info()``'s table: each column, then each configuration that produced it and its counts."""
    from dask_clip.provenance import describe_operation

    lines = [] if not table.empty else ["no derived columns recorded"]
    for column, group in table.groupby("column", sort=False):
        mixed = " (produced differently in different shards)" if len(group) > 1 else ""
        lines.append(f"{column}{mixed}")
        for row in group.itertuples():
            more = f" and {len(row.stems) - SHARDS_NAMED} more" if len(row.stems) > SHARDS_NAMED else ""
            stems = ", ".join(row.stems[:SHARDS_NAMED]) + more
            lines.append(f"  {describe_operation(row.operation)}")
            lines.append(
                f"    {row.shards} shards ({stems}): {row.rows} rows, {row.with_value} with a value, "
                f"{row.with_reason} with a reason, {row.missing} with neither; {row.stale} stale"
            )
    return lines

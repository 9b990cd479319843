"""``dask-clip report``: one self-contained HTML file to share in a review (overview, duplicates, scores, failures)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import add_cluster_options, add_command, add_dataset_options, run_on_cluster

if TYPE_CHECKING:
    pass


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "report",
        "write one self-contained HTML file (thumbnails inline): overview, largest duplicate groups, score "
        "histograms and failures",
        run,
    )
    add_dataset_options(parser)
    parser.add_argument("out", help="the HTML file to write")
    parser.add_argument("--groups", type=int, default=10, help="duplicate groups shown, largest first (default: 10)")
    parser.add_argument("--max-side", type=int, default=128, help="thumbnails' longer side in px (default: 128)")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset.report import write_report

    def report(dataset) -> int:
        return write_report(dataset, args.out, groups=args.groups, max_side=args.max_side)

    return run_on_cluster(args, report, lambda size, seconds: f"wrote {args.out}: {size / 1e6:.1f} MB, {seconds:.1f}s")

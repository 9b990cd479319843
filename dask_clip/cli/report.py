"""``dask-clip report``: one self-contained HTML file to share in a review (overview, duplicates, scores, failures)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dask_clip.cli.shared import add_cluster_options, add_command, add_dataset_options, defaults, run_on_cluster

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

NAME = "report"
HELP = (
    "write one self-contained HTML file (thumbnails inline): overview, largest duplicate groups, score "
    "histograms, the rows each side of each decision's boundary and failures"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from dask_clip.dataset.report import write_report

    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    parser.add_argument("out", help="the HTML file to write")
    options = defaults(write_report)
    parser.add_argument("--groups", type=int, default=options["groups"], help="duplicate groups shown, largest first")
    parser.add_argument(
        "--per-side",
        type=int,
        default=options["per_side"],
        help="rows shown each side of a top fraction's or an image-based filter's boundary",
    )
    parser.add_argument("--max-side", type=int, default=options["max_side"], help="thumbnails' longer side in px")
    parser.add_argument("--overwrite", action="store_true", help="replace a report written before")
    add_cluster_options(parser)


def run(args: argparse.Namespace) -> int:
    from dask_clip.dataset.report import write_report

    def report(dataset: ImageTextPairDataset) -> int:
        options = {"groups": args.groups, "per_side": args.per_side, "max_side": args.max_side}
        return write_report(dataset, args.out, overwrite=args.overwrite, **options)

    return run_on_cluster(args, report, lambda size, seconds: f"wrote {args.out}: {size / 1e6:.1f} MB, {seconds:.1f}s")

"""The ``dask-clip`` command: one subcommand per public operation, one module per subcommand.

Each module declares its options (``add_parser``) next to the code that runs them (``run``); ``shared``
declares the options they have in common and their skeleton. Every subcommand that computes takes the same
cluster options (``--cluster-type``, ``--scheduler-address``, ``--scheduler-file``, ``--n-workers``) and ends
with a one-line summary. Exit codes follow the error classes (``dask_clip.errors``): 0 done; 1 the run failed
on the data (``DataError``: the message names the shard or file) or the cluster; 2 bad arguments, a missing
dependency or a model that cannot be loaded (``ConfigurationError``). The cause is printed once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dask_clip.cli import (
    attach,
    build_index,
    decontaminate,
    dedup,
    demo,
    embed,
    export,
    info,
    locate,
    report,
    reshard,
    search,
    serve,
    target_filter,
)
from dask_clip.cli import filter as filter_
from dask_clip.cli.shared import EXIT_FAILED, EXIT_USAGE, dask_log_level
from dask_clip.errors import ConfigurationError, DaskClipError

COMMANDS = (
    embed,
    dedup,
    filter_,
    target_filter,
    decontaminate,
    reshard,
    search,
    build_index,
    export,
    attach,
    locate,
    info,
    report,
    serve,
    demo,
)
"""The subcommands' modules, in the order ``--help`` lists them."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``only``, of that one, the others listed by name and help alone (their
    options read defaults from the classes they configure, whose imports take seconds)."""
    parser = argparse.ArgumentParser(
        prog="dask-clip",
        description="CLIP image embeddings and curation for WebDataset shards, on Dask.",
        epilog="exit codes: 0 done, 1 the run failed, 2 bad arguments or no usable model",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-shard progress and Dask's own logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        if only is None or only == command.NAME:
            command.add_parser(subparsers)
        else:
            subparsers.add_parser(command.NAME, help=command.HELP)
    return parser


def _command_in(argv: Sequence[str]) -> str:
    """The first word of ``argv`` that is no option: the subcommand (``""`` for ``dask-clip --help``). The only
    option before it, ``-v``, takes no value."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dask-clip ARGV`` (default: ``sys.argv[1:]``) and return its exit code; bad arguments exit (2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=_command_in(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import distributed  # noqa: F401 - it sets its loggers' levels when first imported: import it before ours

    logging.getLogger("distributed").setLevel(dask_log_level(args))
    try:
        return args.run(args)
    except DaskClipError as error:
        print(f"dask-clip {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigurationError) else EXIT_FAILED
    except (OSError, TimeoutError) as error:  # the cluster: a scheduler that cannot be reached, a lost worker
        print(f"dask-clip {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED

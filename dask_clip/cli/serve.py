"""``dask-clip serve``: a read-only web app over a dataset: overview, search, duplicates, scores and failures."""

from __future__ import annotations

import argparse
import sys

from dask_clip.cli.shared import add_cluster_options, add_command, add_dataset_options, cluster

DEFAULT_PORT = 8000
DEFAULT_THUMBNAIL_CACHE_MB = 1024
NAME = "serve"
HELP = "a read-only web app and JSON API to see a dataset's images"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, NAME, HELP, run)
    add_dataset_options(parser)
    parser.add_argument("--index", default=None, help="folder of an index from build-index (default: exact search)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback requires a token")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--token", default=None, help="token every request must carry (default: none on loopback, else a random one)"
    )
    parser.add_argument(
        "--thumbnail-cache-mb",
        type=int,
        default=DEFAULT_THUMBNAIL_CACHE_MB,
        help="MiB of thumbnails kept on disk, in a temporary folder deleted when the server stops; the least "
        "recently used go first (0: none kept)",
    )
    add_cluster_options(parser, n_workers=1)


def run(args: argparse.Namespace) -> int:
    from dask_clip.errors import UsageError
    from dask_clip.optional import require
    from dask_clip.serve import create_app
    from dask_clip.serve.security import token_for

    uvicorn = require("uvicorn", "serve", "dask-clip serve")
    if args.thumbnail_cache_mb < 0:
        raise UsageError(f"--thumbnail-cache-mb must be 0 or more, not {args.thumbnail_cache_mb}")
    cache_bytes = args.thumbnail_cache_mb * 2**20
    token = token_for(args.host, args.token)
    with cluster(args):
        app = create_app(
            args.path, index=args.index, token=token, id_col=args.id_col, thumbnail_cache_bytes=cache_bytes
        )
        host = f"[{args.host}]" if ":" in args.host else args.host
        address = f"http://{host}:{args.port}/" + (f"?token={token}" if token else "")
        print(f"dask-clip serve: {args.path} at {address}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0

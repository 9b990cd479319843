"""Computing a per-shard summary frame shard by shard, with a progress bar that shows rows per second."""

from __future__ import annotations

import logging
import time
from typing import Any

import dask.dataframe as dd
import pandas as pd

logger = logging.getLogger(__name__)


def usable_resources(client: Any, wanted: dict[str, float]) -> dict[str, float]:
    """``wanted`` when some worker of ``client`` offers all of those resources, else ``{}`` (logged)."""
    if not wanted:
        return {}
    offered = [set(info.get("resources", {})) for info in client.scheduler_info(n_workers=-1)["workers"].values()]
    if any(set(wanted) <= names for names in offered):
        return wanted
    logger.info("no worker offers resources %s; running without them", wanted)
    return {}


def compute_shard_summaries(
    summaries: dd.DataFrame, resources: dict[str, float] | None = None, progress: bool = False
) -> pd.DataFrame:
    """Compute a frame of one summary row per partition (with a ``rows`` column), shard by shard.

    On a distributed client each shard is its own future, so a progress bar (``tqdm``, a widget
    in notebooks) advances as shards finish, showing rows per second. A failing shard does not stop
    the others: every shard runs to its end (finished ones are on disk), each failure is logged, and
    then the first failure is raised. Without a client, Dask's default scheduler computes it all at once.
    """
    from distributed import as_completed, get_client

    try:
        client = get_client()
    except ValueError:
        return summaries.compute()
    futures = client.compute(summaries.to_delayed(), resources=usable_resources(client, dict(resources or {})) or None)
    from tqdm.auto import tqdm

    started, rows, parts, failures = time.perf_counter(), 0, [], []
    with tqdm(total=len(futures), unit="shard", disable=not progress, desc="shards") as bar:
        for future in as_completed(futures):
            if future.status == "error":
                failures.append(future.exception())
                logger.error("shard failed: %s", failures[-1])
            else:
                part = future.result()
                parts.append(part)
                rows += int(part["rows"].sum())
            bar.set_postfix(rows=rows, failed=len(failures), rows_per_s=f"{rows / max(time.perf_counter() - started, 1e-9):.1f}")
            bar.update(1)
    if failures:
        if len(failures) > 1:
            logger.error("%d of %d shards failed; raising the first", len(failures), len(futures))
        raise failures[0]
    return pd.concat(parts) if parts else summaries._meta

"""What a dataset's files say about their derived columns: which configuration produced each column, in
how many shards, how many rows have a value or a reason, and which shards disagree or are stale."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pandas as pd

from dask_clip.dataset.plan import read_shard_file
from dask_clip.execution import compute_in_batches
from dask_clip.io.shards import Shard
from dask_clip.provenance import digest

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

INFO_COLUMNS = ["column", "operation", "shards", "rows", "with_value", "with_reason", "missing", "stale", "stems"]


def info(dataset: ImageTextPairDataset) -> pd.DataFrame:
    """One row per derived column and configuration found in the shards' files (read on the cluster):

    ``column``; ``operation`` (the configuration, None when a file records none: an older dask_clip, or a
    column that mixes configurations); ``shards`` holding it so; ``rows`` of those shards, ``with_value``,
    ``with_reason`` (a reason instead of a value) and ``missing`` (neither: never computed there);
    ``stale``: shards whose record is for other rows, or another tar, than the shard holds now; ``stems``
    of those shards. A column with more than one row is produced differently in different shards.
    """
    per_shard = compute_in_batches(_recorded_columns, dataset.shards, id_col=dataset.id_col)
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"operation": None, "shards": 0, "rows": 0, "with_value": 0, "with_reason": 0, "stale": 0, "stems": []}
    )
    for found in (entry for entries in per_shard for entry in entries):
        group = groups[(found["column"], digest(found["operation"]))]
        group["operation"] = found["operation"]
        group["shards"] += 1
        group["stems"].append(found["stem"])
        for key in ("rows", "with_value", "with_reason", "stale"):
            group[key] += found[key]
    rows = [
        {"column": column, **group, "missing": group["rows"] - group["with_value"] - group["with_reason"]}
        for (column, _), group in sorted(groups.items(), key=lambda item: (item[0][0], -item[1]["shards"]))
    ]
    return pd.DataFrame(rows, columns=INFO_COLUMNS)


def _recorded_columns(shard: Shard, id_col: str) -> list[dict[str, Any]]:
    """One entry per derived column that ``shard``'s file records (its reason columns counted with it)."""
    output = read_shard_file(shard, id_col)
    current = {"rows": output.rows, "ids": output.ids, "tar": shard.tar_identity}
    found = []
    for column, record in output.records.columns.items():
        reasons = (record or {}).get("reasons", {})
        if column in reasons.values():
            continue  # a reason column: counted with the column it explains
        reason = reasons.get(column)
        recorded = (record or {}).get("shard") or {}
        found.append(
            {
                "column": column,
                "operation": (record or {}).get("operation"),
                "stem": shard.stem,
                "rows": output.rows,
                "with_value": output.rows - output.null_counts.get(column, output.rows),
                "with_reason": output.rows - output.null_counts.get(reason, output.rows) if reason else 0,
                "stale": int(record is not None and recorded != {k: current[k] for k in recorded}),
            }
        )
    return found

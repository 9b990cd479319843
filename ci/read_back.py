#!/usr/bin/env python
"""Read a folder of parquet files that dask_clip wrote with every reader importable here, and check its vectors.

    python ci/read_back.py FOLDER --expect image_embedding:5:32 [--expect COLUMN:NULLS:WIDTH ...] [--json OUT]

Readers, each tried when its library imports: pyarrow (``pq.read_table`` of each file, and all of them as
one ``pyarrow.dataset``), pandas (``Table.to_pandas``, and ``pd.read_parquet`` of all the files), dask
(``read_parquet`` of all the files), Polars (``read_parquet`` of each file, ``scan_parquet`` of all),
DuckDB (``read_parquet`` of all), Hugging Face datasets (``Dataset.from_parquet`` and
``load_dataset("parquet")``) and LanceDB (a table created from the files). Reading the files as one
dataset checks that its shards' schemas unify.

Each expected column must hold, over the whole folder, exactly NULLS rows without a vector (a null, or
False in a boolean ``<column>_valid`` column beside it), and WIDTH finite values in every other row: an
empty list, a NaN vector or a wrong width posing as a vector fails. Each reader prints one line: ``ok`` or
``FAIL``, the reader and its version, and what it read (with where the width was visible: the column's
type, the file's metadata, or only the values) or the first line of its error. Exit status: 1 when any
reader failed, 2 for bad arguments, 3 when no reader imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

WIDTHS_KEY = "dask_clip.widths"  # file metadata: {"column": width} of list columns of vectors
FIELD_WIDTH_KEY = b"dask_clip.width"  # the same on the column's Arrow field


@dataclass
class Column:
    """One column as a reader gave it: each row's vector (None when null), and its validity column if any."""

    values: list[Any]
    valid: list[Any] | None = None
    width_from: str = "values"  # "type", "metadata" or "values": where a reader sees the width without the data


@dataclass
class Expected:
    name: str
    nulls: int
    width: int


@dataclass
class Result:
    reader: str
    ok: bool
    message: str


# --------------------------------------------------------------------------------------------------
# checking


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


def check(column: Column, expected: Expected) -> tuple[list[str], str]:
    """Problems with ``column`` against ``expected`` (none: it is intact), and a summary of what it holds."""
    values = [None if _is_null(v) else list(v) for v in column.values]
    if column.valid is not None:
        absent = [not (v is True or v == 1) for v in column.valid]
        how = f" (as False in {expected.name}_valid)"
    else:
        absent = [v is None for v in values]
        how = ""
    kinds: dict[str, list[int]] = {}
    for row, (vector, missing) in enumerate(zip(values, absent, strict=True)):
        if missing:
            continue
        if vector is None:
            kind = "null rows marked valid"
        elif len(vector) == 0:
            kind = "empty lists posing as vectors"
        elif len(vector) != expected.width:
            kind = f"vectors of width {len(vector)}"
        elif any(math.isnan(x) for x in vector):
            kind = "NaN vectors posing as data"
        elif not any(vector):
            kind = "zero vectors posing as data"
        else:
            continue
        kinds.setdefault(kind, []).append(row)
    problems = [f"{expected.name}: {len(rows)} {kind} (first at row {rows[0]})" for kind, rows in kinds.items()]
    if sum(absent) != expected.nulls:
        problems.insert(0, f"{expected.name}: {sum(absent)} rows without a vector{how}, expected {expected.nulls}")
    summary = f"{expected.name}: {sum(absent)} nulls{how}, width {expected.width} seen in the {column.width_from}"
    return problems, summary


# --------------------------------------------------------------------------------------------------
# readers: each reads the files and returns their row count and the expected columns


def _widths_in(metadata: dict[bytes, bytes] | None) -> dict[str, int]:
    raw = (metadata or {}).get(WIDTHS_KEY.encode())
    return json.loads(raw) if raw else {}


def _from_arrow(table: Any, names: list[str]) -> dict[str, Column]:
    """Columns of a pyarrow table, the width seen in the type or in the field's or the file's metadata."""
    import pyarrow as pa

    out = {}
    for name in names:
        field_ = table.schema.field(name)
        if pa.types.is_fixed_size_list(field_.type):
            where = "type"
        elif FIELD_WIDTH_KEY in (field_.metadata or {}) or name in _widths_in(table.schema.metadata):
            where = "metadata"
        else:
            where = "values"
        valid = f"{name}_valid"
        out[name] = Column(
            table.column(name).to_pylist(),
            table.column(valid).to_pylist() if valid in table.column_names else None,
            where,
        )
    return out


def _concat(parts: list[dict[str, Column]]) -> dict[str, Column]:
    out = {}
    for name in parts[0]:
        columns = [part[name] for part in parts]
        valid = None if columns[0].valid is None else [v for c in columns for v in c.valid]
        width_from = max((c.width_from for c in columns), key=["type", "metadata", "values"].index)  # the weakest
        out[name] = Column([v for c in columns for v in c.values], valid, width_from)
    return out


def _from_frame(frame: Any, names: list[str]) -> dict[str, Column]:
    """Columns of a pandas frame: an object column of arrays shows its width in its values only."""
    import pandas as pd
    import pyarrow as pa

    out = {}
    for name in names:
        dtype = frame[name].dtype
        arrow = getattr(dtype, "pyarrow_dtype", None)
        where = "type" if arrow is not None and str(arrow).startswith("fixed_size_list") else "values"
        arrow_backed = isinstance(dtype, pd.ArrowDtype)
        values = pa.array(frame[name].array).to_pylist() if arrow_backed else list(frame[name])
        valid = f"{name}_valid"
        out[name] = Column(values, list(frame[valid]) if valid in frame.columns else None, where)
    return out


def read_pyarrow_files(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import pyarrow.parquet as pq

    tables = [pq.read_table(path) for path in files]
    return sum(t.num_rows for t in tables), _concat([_from_arrow(t, names) for t in tables])


def read_pyarrow_dataset(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import pyarrow.dataset as ds

    table = ds.dataset([str(path) for path in files], format="parquet").to_table()
    return table.num_rows, _from_arrow(table, names)


def read_to_pandas(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import pyarrow.parquet as pq

    frames = [pq.read_table(path).to_pandas() for path in files]
    return sum(map(len, frames)), _concat([_from_frame(f, names) for f in frames])


def read_pandas(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import pandas as pd

    frame = pd.read_parquet([str(path) for path in files])  # not the folder: it may hold the shards' tars
    return len(frame), _from_frame(frame, names)


def read_dask(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import dask.dataframe as dd

    frame = dd.read_parquet([str(path) for path in files]).compute(scheduler="sync")
    return len(frame), _from_frame(frame, names)


def _from_polars(frame: Any, names: list[str], metadata: dict[str, int]) -> dict[str, Column]:
    import polars as pl

    out = {}
    for name in names:
        where = "type" if isinstance(frame[name].dtype, pl.Array) else "metadata" if name in metadata else "values"
        valid = f"{name}_valid"
        out[name] = Column(frame[name].to_list(), frame[valid].to_list() if valid in frame.columns else None, where)
    return out


def _polars_widths(path: Path) -> dict[str, int]:
    import polars as pl

    reader = getattr(pl, "read_parquet_metadata", None)  # polars >= 1.9
    raw = reader(path).get(WIDTHS_KEY) if reader else None
    return json.loads(raw) if raw else {}


def read_polars_files(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import polars as pl

    parts = [_from_polars(pl.read_parquet(path), names, _polars_widths(path)) for path in files]
    return sum(len(p[names[0]].values) for p in parts), _concat(parts)


def read_polars_scan(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import polars as pl

    frame = pl.scan_parquet([str(path) for path in files]).collect()
    return len(frame), _from_polars(frame, names, _polars_widths(files[0]))


def read_duckdb(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    import duckdb

    connection = duckdb.connect()
    paths = "[" + ", ".join("'" + str(path).replace("'", "''") + "'" for path in files) + "]"
    kv = connection.sql(f"SELECT key, value FROM parquet_kv_metadata({paths})").fetchall()
    widths = {}
    for key, value in kv:
        if bytes(key).decode() == WIDTHS_KEY:
            widths.update(json.loads(bytes(value)))
    relation = connection.sql(f"SELECT * FROM read_parquet({paths})")
    types = dict(zip(relation.columns, map(str, relation.types), strict=True))
    rows = relation.fetchall()
    index = {name: i for i, name in enumerate(relation.columns)}
    out = {}
    for name in names:
        where = "type" if re.search(r"\[\d+\]$", types[name]) else "metadata" if name in widths else "values"
        valid = f"{name}_valid"
        out[name] = Column(
            [row[index[name]] for row in rows],
            [row[index[valid]] for row in rows] if valid in index else None,
            where,
        )
    return len(rows), out


def _from_hf(dataset: Any, names: list[str]) -> dict[str, Column]:
    out = {}
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for name in names:
        feature = dataset.features[name]
        length = getattr(feature, "length", -1)
        where = "type" if length not in (-1, None) else "values"
        valid = f"{name}_valid"
        out[name] = Column(
            table.column(name).to_pylist(),
            table.column(valid).to_pylist() if valid in dataset.column_names else None,
            where,
        )
    return out


def _hf_cache() -> str:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = tempfile.mkdtemp(prefix="read_back_hf_")
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors are reported here
    return cache


def read_hf_from_parquet(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    cache = _hf_cache()
    import datasets

    dataset = datasets.Dataset.from_parquet([str(path) for path in files], cache_dir=cache)
    return len(dataset), _from_hf(dataset, names)


def read_hf_load_dataset(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    cache = _hf_cache()
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=[str(path) for path in files], split="train", cache_dir=cache)
    return len(dataset), _from_hf(dataset, names)


def read_lancedb(files: list[Path], names: list[str]) -> tuple[int, dict[str, Column]]:
    """A LanceDB table created from the first file and added to from the others (each read by this
    environment's pyarrow), then read back from Lance and searched by each vector column."""
    import lancedb
    import pyarrow.parquet as pq

    database = lancedb.connect(tempfile.mkdtemp(prefix="read_back_lance_"))
    lance = database.create_table("shards", data=pq.read_table(files[0]))
    for path in files[1:]:
        lance.add(pq.read_table(path))
    back = lance.to_arrow()
    columns = _from_arrow(back, names)
    for name in names:
        width = getattr(back.schema.field(name).type, "list_size", 1)
        try:
            lance.search([0.1] * width, vector_column_name=name).limit(2).to_list()
            columns[name].width_from += "; vector search works"
        except Exception as error:  # noqa: BLE001  (a reader's own exception types vary: it is reported)
            columns[name].width_from += f"; no vector search ({_first_line(error)})"
    return back.num_rows, columns


def _version(module: str) -> str:
    return getattr(import_module(module), "__version__", "?")


READERS: list[tuple[str, Sequence[str], Callable[[list[Path], list[str]], tuple[int, dict[str, Column]]]]] = [
    ("pyarrow {pyarrow} read_table", ["pyarrow"], read_pyarrow_files),
    ("pyarrow {pyarrow} dataset", ["pyarrow"], read_pyarrow_dataset),
    ("pandas {pandas} Table.to_pandas (pyarrow {pyarrow})", ["pandas", "pyarrow"], read_to_pandas),
    ("pandas {pandas} read_parquet (pyarrow {pyarrow})", ["pandas", "pyarrow"], read_pandas),
    ("dask {dask} read_parquet (pyarrow {pyarrow})", ["dask.dataframe", "pyarrow"], read_dask),
    ("polars {polars} read_parquet", ["polars"], read_polars_files),
    ("polars {polars} scan_parquet", ["polars"], read_polars_scan),
    ("duckdb {duckdb} read_parquet", ["duckdb"], read_duckdb),
    ("datasets {datasets} Dataset.from_parquet (pyarrow {pyarrow})", ["datasets", "pyarrow"], read_hf_from_parquet),
    ("datasets {datasets} load_dataset (pyarrow {pyarrow})", ["datasets", "pyarrow"], read_hf_load_dataset),
    ("lancedb {lancedb} create_table (pyarrow {pyarrow})", ["lancedb", "pyarrow"], read_lancedb),
]


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of ``error``, and of the error that caused it (a wrapper's own says little)."""

    def line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:200] if text else ''}"

    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    return line(error) if cause is error else f"{line(error)} (from {line(cause)})"


def run(folder: Path, expected: list[Expected], rows: int | None) -> list[Result]:
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise SystemExit(f"{folder}: no parquet files")
    results = []
    for label, modules, reader in READERS:
        try:
            for module in modules:
                import_module(module)
        except ImportError:
            continue
        name = label.format(**{m.split(".")[0]: _version(m.split(".")[0]) for m in modules})
        try:
            count, columns = reader(files, [e.name for e in expected])
        except Exception as error:  # noqa: BLE001  (any reader's failure is the finding: it is reported)
            results.append(Result(name, False, _first_line(error)))
            continue
        problems, summaries = [], [f"{count} rows"]
        if rows is not None and count != rows:
            problems.append(f"{count} rows, expected {rows}")
        for expect in expected:
            found, summary = check(columns[expect.name], expect)
            problems += found
            summaries.append(summary)
        results.append(Result(name, not problems, "; ".join(problems or summaries)))
    return results


def _expected(text: str) -> Expected:
    try:
        name, nulls, width = text.rsplit(":", 2)
        return Expected(name, int(nulls), int(width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not COLUMN:NULLS:WIDTH") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--expect", type=_expected, action="append", required=True, metavar="COLUMN:NULLS:WIDTH")
    parser.add_argument("--rows", type=int, help="rows expected over the whole folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.folder, args.expect, args.rows)
    if not results:
        print(f"{sys.executable}: no reader imports here", file=sys.stderr)
        return 3
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'}  {result.reader}: {result.message}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

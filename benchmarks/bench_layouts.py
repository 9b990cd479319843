#!/usr/bin/env python
"""On-disk layouts of an embedding column with null rows (issue 19): the candidate files every reader is
tried on, and what each layout costs in speed.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_layouts.py                      # speed, N=100,000 x D=768 (about 3 min)
    .venv/bin/python benchmarks/bench_layouts.py --rows 20000         # a quicker look
    .venv/bin/python benchmarks/bench_layouts.py --candidates DIR     # write the small candidate folders
    bash ci/readers.sh DIR/b_list --expect image_embedding:5:32       # then read one with every reader

Layouts (the column ``image_embedding``, beside ``key`` and ``embedding_error`` as dask_clip writes them):

- ``a_fixed``: ``fixed_size_list<float32>[D]``, null rows (today's layout);
- ``b_list``: ``list<float32>``, null rows, the width in the field's and the file's metadata;
- ``c_mixed``: two shards, ``fixed_size_list`` for the one without nulls and ``b_list`` for the one with
  (``c_mixed_nulls_first``: the same, the shard with nulls first);
- ``d_validity``: ``fixed_size_list`` without nulls (zeros in the rows without an embedding) and a boolean
  ``image_embedding_valid`` beside it;
- ``e_float16``: as ``b_list`` in float16;
- ``a_dask``, ``b_dask``: ``a_fixed`` and ``b_list`` written by ``dask.dataframe.to_parquet`` (which keeps
  pandas' metadata) instead of pyarrow's writer as dask_clip calls it.

The speed run times, for ``a_fixed``, ``b_list``, ``d_validity`` and ``e_float16``: writing a shard
(``pq.write_table``, snappy as dask_clip), reading it (``pq.read_table``, then the column as a pandas
Series as dask_clip holds it) and converting the column to ``float32 (N, D)`` with NaN rows:
``embeddings_to_numpy`` for every layout, and ``list_to_numpy`` (below) for the list layouts. Each step is
the best of ``--repeat`` rounds (interleaved); the table gives wall seconds and the process's CPU seconds
(steadier than wall time on a shared machine; pyarrow's reader threads add up in it), each with its ratio
to ``a_fixed`` (``list_to_numpy`` against ``a_fixed``'s ``embeddings_to_numpy``). JSON goes to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.columns import STRING, embeddings_to_numpy, to_embedding_array
from dask_clip.io.metadata import write_shard_metadata
from dask_clip.provenance import FileRecords

COLUMN = "image_embedding"
NULL_ROWS = (3, 22, 50, 77, 108)  # 5 of the 109 rows of a candidate shard; 22 as in the issue
WIDTHS_KEY = b"dask_clip.widths"  # file metadata: {"column": width} of each list column of vectors
FIELD_WIDTH_KEY = b"dask_clip.width"  # the same, on the column's Arrow field


# --------------------------------------------------------------------------------------------------
# the layouts


def sample(rows: int, width: int, null_rows: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``float32 (rows, width)`` vectors and the ``bool (rows,)`` mask of rows that have one."""
    vectors = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    valid = np.ones(rows, dtype=bool)
    valid[list(null_rows)] = False
    return vectors, valid


def list_array(vectors: np.ndarray, valid: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.ListArray:
    """``list<value_type>`` of the valid rows' vectors, null (and empty) where not valid."""
    rows, width = vectors.shape
    offsets = np.zeros(rows + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(valid, width, 0))
    values = pa.array(np.ascontiguousarray(vectors[valid]).reshape(-1).astype(value_type.to_pandas_dtype()))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


def _frame(vectors: np.ndarray, valid: np.ndarray, shard: int) -> pd.DataFrame:
    keys = [f"{shard:05d}{row:04d}" for row in range(len(valid))]
    errors = [None if ok else "no image in the tar (status: failed_to_download)" for ok in valid]
    return pd.DataFrame({"key": pd.array(keys, dtype=STRING), "embedding_error": pd.array(errors, dtype=STRING)})


def _table(frame: pd.DataFrame, columns: dict[str, pa.Array], widths: dict[str, int] | None = None) -> pa.Table:
    """``frame`` (key, embedding_error) with ``columns`` inserted after the key; without pandas' metadata (as
    dask_clip writes), and with the width of each list column of vectors in ``widths`` recorded."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for position, (name, array) in enumerate(columns.items(), start=1):
        field = pa.field(name, array.type)
        if widths and name in widths:
            field = field.with_metadata({FIELD_WIDTH_KEY: str(widths[name]).encode()})
        table = table.add_column(position, field, array)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    if widths:
        metadata[WIDTHS_KEY] = json.dumps(widths).encode()
    return table.replace_schema_metadata(metadata)


def layout_table(layout: str, vectors: np.ndarray, valid: np.ndarray, shard: int = 0) -> pa.Table:
    """One shard's table in ``layout`` (a_fixed, b_list, d_validity, e_float16, or f_fixed for a shard
    without nulls)."""
    frame = _frame(vectors, valid, shard)
    width = vectors.shape[1]
    if layout in ("a_fixed", "f_fixed"):
        return _table(frame, {COLUMN: pa.array(to_embedding_array(vectors, valid))})
    if layout == "b_list":
        return _table(frame, {COLUMN: list_array(vectors, valid)}, {COLUMN: width})
    if layout == "e_float16":
        return _table(frame, {COLUMN: list_array(vectors, valid, pa.float16())}, {COLUMN: width})
    if layout == "d_validity":
        zeros = np.where(valid[:, None], vectors, 0).astype(np.float32)
        fixed = pa.FixedSizeListArray.from_arrays(pa.array(zeros.reshape(-1)), width)
        return _table(frame, {COLUMN: fixed, f"{COLUMN}_valid": pa.array(valid)})
    raise ValueError(f"{layout!r}: not a layout (a_fixed, b_list, d_validity, e_float16, f_fixed)")


def write_candidates(folder: Path, rows: int = 109, width: int = 32) -> list[Path]:
    """Each candidate layout as a folder of shards under ``folder``; ``a_fixed`` through dask_clip's own writer."""
    import dask.dataframe as dd

    vectors, valid = sample(rows, width, NULL_ROWS)
    written = []

    def shard(name: str, number: int, table: pa.Table) -> None:
        path = folder / name / f"{number:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        written.append(path)

    frame = _frame(vectors, valid, 0)
    frame.insert(1, COLUMN, to_embedding_array(vectors, valid))
    (folder / "a_fixed").mkdir(parents=True, exist_ok=True)
    write_shard_metadata(frame, str(folder / "a_fixed" / "00000.parquet"), FileRecords(id_col="key"))
    written.append(folder / "a_fixed" / "00000.parquet")
    for layout in ("b_list", "d_validity", "e_float16"):
        shard(layout, 0, layout_table(layout, vectors, valid))
    # fixed_size_list only where a shard has no null: one shard of each, read as one dataset
    shard("c_mixed", 0, layout_table("f_fixed", *sample(rows, width, (), seed=1), shard=0))
    shard("c_mixed", 1, layout_table("b_list", vectors, valid, shard=1))
    shard("c_mixed_nulls_first", 0, layout_table("b_list", vectors, valid, shard=0))
    shard("c_mixed_nulls_first", 1, layout_table("f_fixed", *sample(rows, width, (), seed=1), shard=1))
    for layout in ("a_fixed", "b_list"):
        table = layout_table(layout, vectors, valid)
        dd.from_pandas(table.to_pandas(types_mapper=pd.ArrowDtype), npartitions=1).to_parquet(
            folder / f"{layout[0]}_dask", write_index=False
        )
        written += sorted((folder / f"{layout[0]}_dask").glob("*.parquet"))
    return written


# --------------------------------------------------------------------------------------------------
# the conversion a list layout needs


def list_to_numpy(column: pd.Series, width: int) -> np.ndarray:
    """A ``list<float>`` embedding column (pyarrow-backed) -> ``float32 (N, width)``, NaN in null rows.

    No Python loop and no ``filter``: the child values are sliced out once by the offsets. When every
    null row is empty (as dask_clip writes them) the valid rows' values are contiguous and are reshaped
    whole; otherwise each valid row's ``width`` values are gathered from its start offset.
    ``ValueError`` when a non-null row does not hold ``width`` values.
    """
    lists = pa.chunked_array(pa.array(column.array)).combine_chunks()
    offsets = np.asarray(lists.offsets)  # len + 1, already shifted by a slice's offset
    lengths = np.diff(offsets)
    valid = ~np.asarray(lists.is_null(), dtype=bool)
    wrong = np.flatnonzero(valid & (lengths != width))
    if len(wrong):
        raise ValueError(f"row {wrong[0]} of {column.name!r} holds {lengths[wrong[0]]} values, not {width}")
    values = lists.values.to_numpy(zero_copy_only=False)
    out = np.full((len(lists), width), np.nan, dtype=np.float32)
    if (lengths[~valid] == 0).all():  # the valid rows' values are one contiguous run
        out[valid] = values[offsets[0] : offsets[-1]].reshape(-1, width)
    else:
        starts = offsets[:-1][valid]
        out[valid] = values[starts[:, None] + np.arange(width)]
    return out


def validity_to_numpy(column: pd.Series, valid: pd.Series) -> np.ndarray:
    """A ``fixed_size_list`` column without nulls and its validity column -> ``float32 (N, D)``, NaN where
    not valid."""
    out = embeddings_to_numpy(column)
    out[~np.asarray(valid, dtype=bool)] = np.nan
    return out


# --------------------------------------------------------------------------------------------------
# the measurement


def measure(layouts: tuple[str, ...], vectors: np.ndarray, valid: np.ndarray, folder: Path, repeat: int) -> dict:
    """Seconds of each step of each layout, the fastest of ``repeat`` rounds; the rounds interleave the layouts,
    so that a burst of other load on a shared machine slows one round of each rather than one layout."""
    width = vectors.shape[1]
    tables = {layout: layout_table(layout, vectors, valid) for layout in layouts}
    paths = {layout: folder / f"{layout}.parquet" for layout in layouts}
    results: dict[str, dict[str, Any]] = {layout: {} for layout in layouts}

    def conversions(layout: str, back: pd.DataFrame) -> dict[str, Callable[[], np.ndarray]]:
        if layout == "d_validity":
            return {"embeddings_to_numpy": lambda: validity_to_numpy(back[COLUMN], back[f"{COLUMN}_valid"])}
        steps = {"embeddings_to_numpy": lambda: embeddings_to_numpy(back[COLUMN])}
        if layout in ("b_list", "e_float16"):
            steps["list_to_numpy"] = lambda: list_to_numpy(back[COLUMN], width)
        return steps

    def timed(layout: str, step: str, run: Callable[[], Any]) -> Any:
        started, cpu_started = time.perf_counter(), time.process_time()
        out = run()
        for key, seconds in (
            (f"{step}_s", time.perf_counter() - started),
            (f"{step}_cpu_s", time.process_time() - cpu_started),
        ):
            results[layout][key] = min(seconds, results[layout].get(key, seconds))
        return out

    arrays: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(repeat):
        for layout in layouts:
            timed(layout, "write", lambda layout=layout: pq.write_table(tables[layout], paths[layout]))
            back = timed(
                layout, "read", lambda layout=layout: pq.read_table(paths[layout]).to_pandas(types_mapper=pd.ArrowDtype)
            )
            for name, step in conversions(layout, back).items():
                arrays[layout, name] = timed(layout, name, step)
    for (layout, name), array in arrays.items():  # every conversion gave the vectors back, NaN where none
        assert np.isnan(array[~valid]).all() and not np.isnan(array[valid]).any(), (layout, name)
        if layout == "e_float16":  # float16 vectors against the float32 ones: the cosine they lose
            cosine = (array[valid] * vectors[valid]).sum(1) / np.linalg.norm(array[valid], axis=1)
            results[layout]["float16_min_cosine"] = float(cosine.min())
        else:
            np.testing.assert_array_equal(array[valid], vectors[valid], err_msg=f"{layout} {name}")
    for layout in layouts:
        results[layout]["mb"] = paths[layout].stat().st_size / 2**20
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--nulls", type=float, default=0.05, help="share of rows without an embedding")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--candidates", type=Path, help="write the small candidate folders here, and stop")
    args = parser.parse_args()
    if args.candidates:
        for path in write_candidates(args.candidates):
            print(path)
        return

    started = time.perf_counter()
    rng = np.random.default_rng(1)
    null_rows = tuple(rng.choice(args.rows, int(args.rows * args.nulls), replace=False))
    vectors, valid = sample(args.rows, args.width, null_rows)
    layouts = ("a_fixed", "b_list", "d_validity", "e_float16")
    harness.log(started, f"{layouts}: {args.rows} x {args.width}, {len(null_rows)} null rows, {args.repeat} rounds")
    with tempfile.TemporaryDirectory() as folder:
        results = measure(layouts, vectors, valid, Path(folder), args.repeat)

    base = results["a_fixed"]
    steps = ("write_s", "read_s", "embeddings_to_numpy_s", "list_to_numpy_s")
    rows = []
    for layout in layouts:
        cells = [layout, f"{results[layout]['mb']:.0f}"]
        for step in steps:
            if step not in results[layout]:
                cells.append("")
                continue
            reference = step if step in base else "embeddings_to_numpy_s"
            wall, cpu = results[layout][step], results[layout][step.replace("_s", "_cpu_s")]
            cpu_base = base[reference.replace("_s", "_cpu_s")]
            cells.append(f"{wall:.2f} s ({wall / base[reference]:.2f}x); CPU {cpu:.2f} s ({cpu / cpu_base:.2f}x)")
        rows.append(cells)
    harness.print_table(["layout", "MB", "write", "read", "embeddings_to_numpy", "list_to_numpy"], rows)
    if "float16_min_cosine" in results["e_float16"]:
        print(f"\nfloat16: 1 - min cosine to the float32 vector = {1 - results['e_float16']['float16_min_cosine']:.1e}")
    import pyarrow

    machine = {**harness.machine(), "pyarrow": pyarrow.__version__, "numpy": np.__version__}
    harness.write_results(
        "bench_layouts",
        {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
    )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

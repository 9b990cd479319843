"""Dataframe backends of a dataset's metadata: pandas (CPU) or cudf (GPU extra).

dask_clip's own operations always run on pandas partitions (pyarrow-backed columns); with the cudf
backend, a dataset's ``metadata`` is converted to cudf for the user and back to pandas for each
operation, lazily, partition by partition. Importing this module imports no GPU library.
"""

from __future__ import annotations

import dask.dataframe as dd

from dask_clip.arguments import one_of
from dask_clip.optional import require

BACKENDS = ("pandas", "cudf")


def check_backend(backend: str) -> None:
    """``UsageError`` for an unknown backend, ``MissingDependencyError`` naming the extra when cudf is missing."""
    one_of("backend", backend, BACKENDS)
    if backend == "cudf":
        require("cudf", "gpu", 'backend="cudf"')
        require("dask_cudf", "gpu", 'backend="cudf"')


def convert(frame: dd.DataFrame, backend: str) -> dd.DataFrame:
    """``frame`` on ``backend`` (a lazy, per-partition conversion; nothing when it is there already)."""
    current = "cudf" if type(frame._meta).__module__.startswith("cudf") else "pandas"
    return frame if current == backend else frame.to_backend(backend)

"""Dataframe backends of a dataset's metadata: pandas (CPU) or cudf (GPU extra).

dask_clip's own operations always run on pandas partitions (pyarrow-backed columns); with the cudf
backend, a dataset's ``metadata`` is converted to cudf for the user and back to pandas for each
operation, lazily, partition by partition. Importing this module imports no GPU library.
"""

from __future__ import annotations

import dask.dataframe as dd

BACKENDS = ("pandas", "cudf")
GPU_EXTRA_HINT = 'pip install "dask_clip[gpu]"'


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` for an unknown backend, ``ImportError`` naming the extra when cudf is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "cudf":
        try:
            import cudf  # noqa: F401
            import dask_cudf  # noqa: F401
        except ImportError as error:
            raise ImportError(f'backend="cudf" needs cudf and dask-cudf: {GPU_EXTRA_HINT} ({error})') from error


def convert(frame: dd.DataFrame, backend: str) -> dd.DataFrame:
    """``frame`` on ``backend`` (a lazy, per-partition conversion; nothing when it is there already)."""
    current = "cudf" if type(frame._meta).__module__.startswith("cudf") else "pandas"
    return frame if current == backend else frame.to_backend(backend)

"""Every error dask_clip raises on purpose, in one hierarchy.

Two branches tell a user what to do next, and the CLI maps them to its exit codes:

- ``ConfigurationError`` (exit 2): fix the call. Bad arguments, a missing column, a model that cannot be
  loaded, a missing optional dependency, a device that is not there.
- ``DataError`` (exit 1): fix (or skip) the data. A shard that cannot be read or processed, a write that
  failed. The message starts with the file it concerns.

Each class also derives from the builtin exception of its kind of failure (``ValueError``, ``OSError``,
``ImportError``), so ``except ValueError`` catches a ``UsageError`` too. Where that builtin
is an ``OSError``, it comes first among the bases: an error raised on a worker must unpickle on the
client, and only ``OSError``'s own constructor can rebuild such an instance.
"""

from __future__ import annotations


class DaskClipError(Exception):
    """Base of every error dask_clip raises on purpose."""


class ConfigurationError(DaskClipError):
    """The call cannot work as given; nothing was computed (CLI exit code 2)."""


class UsageError(ConfigurationError, ValueError):
    """An argument is out of range, unknown or contradicts another one."""


class ColumnError(UsageError):
    """A column an operation reads is missing or has the wrong type; the message names the column."""


class DatasetNotFoundError(FileNotFoundError, UsageError):
    """The folder given as a dataset does not exist."""


class MissingDependencyError(ConfigurationError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


class ModelLoadError(ConfigurationError, OSError):
    """A model's configuration or weights cannot be found, or are not safe to load."""


class CheckpointError(ModelLoadError):
    """A classifier checkpoint is missing, unsafe to load or does not fit the architecture; names the file."""


class DeviceUnavailableError(ConfigurationError, RuntimeError):
    """A device was asked for where there is none (a GPU cluster without a GPU, ``device="cuda"`` on a CPU
    worker); the message names the host."""


class DeviceSetupError(ConfigurationError, RuntimeError):
    """A worker's GPU stack does not work: torch cannot use the GPUs the driver sees, TorchCodec does not load
    or cannot decode on the device (no nvJPEG). The message names the host, the torch and CUDA versions and the fix."""


class DeviceOutOfMemoryError(ConfigurationError, RuntimeError):
    """A model's batch does not fit in its device's memory; the message names the host, the batch and the fix."""


class UnsupportedDaskError(ConfigurationError, RuntimeError):
    """The installed dask lacks the dataframe internals dask_clip reads to give each task its worker resources;
    the message names dask's version."""


class FolderLockedError(FileExistsError, ConfigurationError):
    """Another run writes into the folder this run would write into (it holds the folder's lock file); nothing was
    written. The message starts with the lock file, names the holder (host, pid, since when, command) and says how
    to remove a stale lock."""


class DataError(DaskClipError, ValueError):
    """The data cannot be processed as it is (CLI exit code 1); the message starts with the file."""


class DatasetLayoutError(DataError):
    """A folder of shards is empty, or holds a tar without its parquet (or the reverse)."""


class ShardError(DataError):
    """A failure while processing one shard. The message starts with the shard's tar (or parquet), and
    ``__cause__`` holds the original error when there was one."""


class ShardReadError(ShardError):
    """A shard's tar cannot be read as WebDataset; the message names the file and the member."""


class ShardMetadataError(ShardError):
    """A shard's parquet cannot be used as it is; the message names the file."""


class WriteError(OSError, DataError):
    """A file could not be written (disk full, permissions, ...); the message starts with its path."""


class IndexFileError(DataError):
    """An index file that faiss cannot read (truncated, corrupt, from another faiss); names the file."""


class StaleIndexError(DataError):
    """An index was built from other data than the dataset holds now (rows or embeddings changed since); the
    message starts with the index's path and names the first shard that differs. Rebuild the index."""


class MixedProvenanceError(DataError):
    """A derived column that an operation reads was not produced by one run over the data the shards hold now:
    shards hold it from different configurations or runs (an interrupted re-run), lack it, or hold it for other
    rows or inputs. The message names the shards, the configurations found and the command that fixes it."""


class ImageLocationError(DataError):
    """A recorded image location (``image_offset``, ``image_size``) does not hold the row's image: the tar changed
    since its images were located, or the location is wrong. The message names the tar, the key and the offset;
    ``dask-clip locate`` records the locations again."""


class ImageDecodeError(DataError):
    """One sample's bytes cannot be made into an image; the message is the row's reason.

    Never raised out of a shard on its own: it becomes the row's ``embedding_error``, or, with
    ``on_error="raise"``, a ``ShardReadError`` naming the tar and the key.
    """

"""Stream the samples of a WebDataset tar: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``, ... grouped by key,
and match their keys to a shard's rows.

The tar is read front to back as a stream (``mode="r|*"``), so a shard on object storage is never
downloaded whole nor held in memory. ``iter_tar_members`` yields one member at a time (with
``headers_only=True`` it seeks past each member's data instead, to locate members without reading them);
``iter_tar_samples`` groups them into samples, reading only the members an operation wants and at most
``max_sample_bytes`` of them per sample (a member's size is its expanded size, so a sparse member counts in full).
``RowKeys`` is the one rule, for every operation, that says which row a sample's key belongs to.
"""

from __future__ import annotations

import posixpath
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import pandas as pd
import pyarrow as pa

from dask_clip.errors import ShardMetadataError, ShardReadError
from dask_clip.io.shards import filesystem_of

DEFAULT_MAX_SAMPLE_BYTES = 256 * 1024 * 1024
"""The most bytes of one sample's members that are read into memory at once."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
"""Extensions of image members (any case), in the order one is chosen when a sample has several."""


def is_image_extension(extension: str) -> bool:
    """Whether a member with this extension (``"jpg"``, ``"JPG"``) is an image member."""
    return extension.lower() in IMAGE_EXTENSIONS


@dataclass
class Sample:
    """The members of one sample, by extension as written in the tar (``{"jpg": b"...", "txt": b"..."}``).

    ``problems`` holds a reason per member that was present but not read (over the sample's byte limit),
    ``unread`` the extensions of members no one asked for (skipped without being read).
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)

    @property
    def extensions(self) -> list[str]:
        """The extensions of all its members, read or not, sorted."""
        return sorted([*self.members, *self.problems, *self.unread])

    def image_member(self) -> str | None:
        """The extension of the sample's image member (read, or refused with a reason in ``problems``)."""
        return image_extension([*self.problems, *self.members])


def image_extension(extensions: Iterable[str]) -> str | None:
    """Which of a sample's member ``extensions`` is its image: the first of ``IMAGE_EXTENSIONS`` it has, in any
    case, as written (``"JPG"``); None when it has no image member."""
    present = {extension.lower(): extension for extension in extensions}
    return next((present[e] for e in IMAGE_EXTENSIONS if e in present), None)


@dataclass
class Member:
    """One file of the tar at ``url``: its full name, its sample's key and extension, its size and ``offset``, the
    byte of the tar where its data starts (None for a sparse member, whose data is not stored in one piece);
    ``read`` its bytes (before the next member is yielded)."""

    url: str
    name: str
    key: str
    extension: str
    size: int
    offset: int | None
    data: IO[bytes] | None

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the member (all by default); ``ShardReadError`` naming the tar when it is cut."""
        if self.data is None:
            return b""
        try:
            return self.data.read(size)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ShardReadError(f"{self.url}: cannot read tar (at member {self.name!r}): {error}") from error


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000010005.jpg"`` -> (``"dir/000010005"``, ``"jpg"``): the key ends at the first dot of the
    file name, as in webdataset, so ``"a.seg.png"`` has the extension ``"seg.png"``. The extension is kept
    as written (``"JPG"``). A leading ``"./"`` (as ``tar -cf shard.tar .`` writes) is not part of the key."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension


def check_member_name(name: str, url: str) -> None:
    """Refuse absolute member names and names that climb out with ``..``."""
    if name.startswith("/") or ".." in name.split("/"):
        raise ShardReadError(f"{url}: unsafe member name {name!r} (absolute or containing '..')")


def tarinfo_recording_header_errors(header_errors: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A ``TarInfo`` class that appends to ``header_errors`` every member header it cannot read.

    ``tarfile`` ends the member list silently at an unreadable header after the first member, so a
    tar cut at a member boundary or inside a header looks complete: only a zero block
    (``EOFHeaderError``) is a real end of archive.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(archive)
            except tarfile.HeaderError as error:
                header_errors.append(error)
                raise

    return RecordingTarInfo


def iter_tar_members(url: str, headers_only: bool = False) -> Iterator[Member]:
    """Yield the files of the tar at ``url`` in file order; each member's ``data`` is readable until the next.

    ``headers_only=True`` opens the tar as a seekable file and seeks past each member's data rather than reading
    through it (a tar read for its members' offsets); such a tar must be uncompressed.

    Raises ``ShardReadError`` naming the file for a truncated or corrupt tar, an unsafe member name, a
    link member, a member name that appears twice (as the webdataset library does), or a key whose members
    are not contiguous (split samples would be mis-grouped).
    """
    fs, path = filesystem_of(url)
    names: set[str] = set()
    keys: set[str] = set()
    current_key: str | None = None
    member_name: str | None = None
    header_errors: list[tarfile.HeaderError] = []
    tarinfo = tarinfo_recording_header_errors(header_errors)
    try:
        mode = "r:" if headers_only else "r|*"
        with fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode=mode, tarinfo=tarinfo) as archive:
            for member in archive:
                member_name = member.name
                if member.isdir():
                    continue
                check_member_name(member.name, url)
                if not member.isfile():
                    raise ShardReadError(f"{url}: member {member.name!r} is a link or device, not a file")
                key, extension = split_member_name(member.name)
                if f"{key}.{extension}" in names:
                    raise ShardReadError(f"{url}: member {member.name!r} appears twice in the tar")
                names.add(f"{key}.{extension}")
                if key != current_key:
                    if key in keys:
                        raise ShardReadError(f"{url}: members of key {key!r} are not contiguous in the tar")
                    keys.add(key)
                    current_key = key
                offset = None if member.issparse() else member.offset_data
                yield Member(url, member.name, key, extension, member.size, offset, archive.extractfile(member))
            end = header_errors[-1] if header_errors else None
            if not isinstance(end, tarfile.EOFHeaderError):
                raise ShardReadError(
                    f"{url}: truncated or corrupt tar: {end} at byte {archive.offset}, after member "
                    f"{member_name!r}, where the end-of-archive marker or a member header should be"
                )
    except (tarfile.TarError, EOFError, OSError) as error:
        where = f"at member {member_name!r}" if member_name is not None else "at its start"
        hint = "; members are located only in uncompressed tars" if headers_only and member_name is None else ""
        raise ShardReadError(f"{url}: cannot read tar ({where}): {error}{hint}") from error


def iter_tar_samples(
    url: str,
    wanted: Callable[[str], bool] | None = None,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[Sample]:
    """Yield the samples of the tar at ``url`` in file order, one ``Sample`` per key.

    Only members whose extension ``wanted`` accepts (all by default) are read; the others are skipped
    unread. A member that would take the sample's read members over ``max_sample_bytes`` is not read: it
    gets a reason in ``problems``. Errors are those of ``iter_tar_members``.
    """
    current: Sample | None = None
    budget = max_sample_bytes
    for member in iter_tar_members(url):
        if current is None or member.key != current.key:
            if current is not None:
                yield current
            current, budget = Sample(member.key), max_sample_bytes
        if wanted is not None and not wanted(member.extension):
            current.unread.append(member.extension)
            continue
        if member.size > budget:
            current.problems[member.extension] = (
                f"{member.extension} member is {member.size} bytes, over what is left of the sample's limit "
                f"({budget} of {max_sample_bytes} bytes, max_sample_bytes)"
            )
            continue
        budget -= member.size
        current.members[member.extension] = member.read()
    if current is not None:
        yield current


def normalized_key(value: object) -> str:
    """A sample key or a string id as matched: NFC-normalised text (``é`` composed or not is one key)."""
    return unicodedata.normalize("NFC", str(value))


class RowKeys:
    """Which row of a shard a sample key belongs to: one rule for every operation that reads tars.

    Keys match string ids after Unicode NFC normalisation; for an integer id column, a key matches the id
    it spells as a decimal number (``"0001"`` is row id ``1``, as img2dataset's zero-padded keys are).
    """

    def __init__(self, ids: pd.Series, url: str) -> None:
        self.url = url
        self.integer = pa.types.is_integer(pa.array(ids.array[:0]).type)
        self.positions: dict[object, int] = {}
        for position, value in enumerate(ids):
            normalized = int(value) if self.integer else normalized_key(value)
            if normalized in self.positions:
                raise ShardMetadataError(
                    f"{url}: ids {ids.iloc[self.positions[normalized]]!r} and {value!r} are the same key once "
                    "normalised (Unicode NFC): a tar member could not tell them apart"
                )
            self.positions[normalized] = position

    def position(self, key: str) -> int | None:
        """The row of sample ``key``, or None when no row has it."""
        if self.integer:
            return self.positions.get(int(key)) if key.isascii() and key.isdecimal() else None
        return self.positions.get(normalized_key(key))

    def unknown_keys_error(self, keys: list[str], id_col: str) -> ShardReadError:
        """The error for tar samples whose keys no row has (rows are never invented)."""
        return ShardReadError(
            f"{self.url}: {len(keys)} samples have keys that the shard's parquet lacks (column {id_col!r}), "
            f"e.g. {keys[:5]}"
        )

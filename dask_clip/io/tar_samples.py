"""Stream the samples of a WebDataset tar: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``, ... grouped by key.

The tar is read front to back as a stream (``mode="r|*"``), so a shard on object storage is never
downloaded whole nor held in memory: only the members of one sample are.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from dask_clip.errors import ShardReadError
from dask_clip.io.shards import filesystem_of

DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
"""Extensions of image members, in the order one is chosen when a sample has several."""


@dataclass
class Sample:
    """The members of one sample, by extension (``{"jpg": b"...", "txt": b"..."}``).

    ``problems`` holds a reason per member that was present but not read (too large).
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def image_member(self) -> str | None:
        """The extension of the sample's image member (read, or refused with a reason in ``problems``):
        the first of ``IMAGE_EXTENSIONS`` it has; None when it has no image member."""
        return next((e for e in IMAGE_EXTENSIONS if e in self.members or e in self.problems), None)


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000010005.jpg"`` -> (``"dir/000010005"``, ``"jpg"``): the key ends at the first dot of the
    file name, as in webdataset, so ``"a.seg.png"`` has the extension ``"seg.png"``. A leading ``"./"``
    (as ``tar -cf shard.tar .`` writes) is not part of the key."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


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


def iter_tar_samples(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield the samples of the tar at ``url`` in file order, one ``Sample`` per key.

    Raises ``ShardReadError`` naming the file for a truncated or corrupt tar, an unsafe member name,
    a link member, or a key whose members are not contiguous (split samples would be mis-grouped).
    """
    fs, path = filesystem_of(url)
    seen: set[str] = set()
    current: Sample | None = None
    member_name: str | None = None
    header_errors: list[tarfile.HeaderError] = []
    tarinfo = tarinfo_recording_header_errors(header_errors)
    try:
        with fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r|*", tarinfo=tarinfo) as archive:
            for member in archive:
                member_name = member.name
                if member.isdir():
                    continue
                check_member_name(member.name, url)
                if not member.isfile():
                    raise ShardReadError(f"{url}: member {member.name!r} is a link or device, not a file")
                key, extension = split_member_name(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ShardReadError(f"{url}: members of key {key!r} are not contiguous in the tar")
                    seen.add(key)
                    current = Sample(key)
                if member.size > max_member_bytes:
                    current.problems[extension] = (
                        f"{extension} member is {member.size} bytes (limit {max_member_bytes})"
                    )
                    continue
                data = archive.extractfile(member)
                current.members[extension] = data.read() if data is not None else b""
            end = header_errors[-1] if header_errors else None
            if not isinstance(end, tarfile.EOFHeaderError):
                raise ShardReadError(
                    f"{url}: truncated or corrupt tar: {end} at byte {archive.offset}, after member "
                    f"{member_name!r}, where the end-of-archive marker or a member header should be"
                )
    except (tarfile.TarError, EOFError, OSError) as error:
        where = f"at member {member_name!r}" if member_name is not None else "at its start"
        raise ShardReadError(f"{url}: cannot read tar ({where}): {error}") from error
    if current is not None:
        yield current

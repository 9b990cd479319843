"""Rows of a frame as a grid of thumbnails: HTML with the images inline (base64 JPEGs), for notebooks and reports.

``row_tiles`` makes one ``Tile`` per row of a frame that names each row's tar (``tar_url``) and key: its thumbnail
(``images.thumbnails.row_thumbnail``: one ranged read, cached) and the lines shown under it. Rows without
``image_offset``/``image_size`` columns (their dataset not located yet) are located by a pass over its tar's
member headers (``io.image_access.image_locations``: the images' data is never read); a row without an image
gets a placeholder that says why. ``ThumbnailGrid`` renders tiles as HTML (``_repr_html_``, which Jupyter shows).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dask_clip.errors import ImageDecodeError, ImageLocationError, ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import ThumbnailCache, row_thumbnail
from dask_clip.io.image_access import image_locations
from dask_clip.io.tar_samples import RowKeys

OFFSET = "image_offset"
SIZE = "image_size"
NO_IMAGE = "no image member in the tar"


@dataclass(frozen=True)
class Tile:
    """One row in a grid: its JPEG thumbnail (None when it has none, ``reason`` saying why) and the lines under it."""

    jpeg: bytes | None
    lines: tuple[str, ...]
    reason: str | None = None

    def html(self, max_side: int) -> str:
        if self.jpeg is not None:
            source = "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")
            picture = f'<img src="{source}" alt="{html.escape(self.lines[0] if self.lines else "")}">'
        else:
            picture = (
                f'<div class="dask-clip-missing" style="width:{max_side}px;height:{max_side * 3 // 4}px;'
                "background:#eee;color:#a00;display:flex;align-items:center;justify-content:center;"
                f'text-align:center;font-size:11px">{html.escape(self.reason or NO_IMAGE)}</div>'
            )
        caption = "<br>".join(html.escape(line) for line in self.lines)
        return (
            f'<figure style="width:{max_side}px;margin:0">{picture}'
            f'<figcaption style="font-size:11px;word-wrap:break-word">{caption}</figcaption></figure>'
        )


@dataclass(frozen=True)
class ThumbnailGrid:
    """Thumbnails of ``frame``'s rows, one ``Tile`` each in row order; Jupyter shows it as an HTML grid."""

    tiles: tuple[Tile, ...]
    frame: pd.DataFrame = field(repr=False)
    max_side: int = 160
    title: str | None = None

    def _repr_html_(self) -> str:
        heading = f"<h4>{html.escape(self.title)}</h4>" if self.title else ""
        tiles = "".join(tile.html(self.max_side) for tile in self.tiles)
        return f'{heading}<div class="dask-clip-grid" style="display:flex;flex-wrap:wrap;gap:8px">{tiles}</div>'

    def __repr__(self) -> str:
        missing = sum(tile.jpeg is None for tile in self.tiles)
        lines = [f"ThumbnailGrid({len(self.tiles)} rows, {missing} without an image)"]
        if self.title:
            lines.insert(0, self.title)
        for tile in self.tiles:
            shown = " | ".join(tile.lines)
            lines.append(f"  {shown}" + (f"  [no image: {tile.reason}]" if tile.jpeg is None else ""))
        return "\n".join(lines)


def row_tiles(
    rows: pd.DataFrame,
    id_col: str,
    line_columns: Sequence[str],
    *,
    error_columns: Sequence[str] = (),
    max_side: int = 160,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cache: ThumbnailCache | None = None,
) -> list[Tile]:
    """One ``Tile`` per row of ``rows`` (which has ``tar_url`` and ``id_col``, and may have ``image_offset`` and
    ``image_size``), its lines the values of ``line_columns`` (``column: value``, the id alone). A row without an
    image gets a placeholder whose reason is the first value it has of ``error_columns``, else why its image cannot
    be read."""
    offsets, sizes, unreadable = _locations(rows, id_col)
    tiles = []
    for position, (_, row) in enumerate(rows.iterrows()):
        lines = tuple(
            _line(column, row[column], id_col)
            for column in line_columns
            if column in rows.columns and not _missing(row[column])
        )
        errors = [row[column] for column in error_columns if column in rows.columns and not _missing(row[column])]
        reason = str(errors[0]) if errors else unreadable.get(row["tar_url"])
        if _missing(offsets[position]):
            tiles.append(Tile(None, lines, reason or NO_IMAGE))
            continue
        try:
            jpeg = row_thumbnail(
                row["tar_url"],
                int(offsets[position]),
                int(sizes[position]),
                row[id_col],
                max_side=max_side,
                max_image_pixels=max_image_pixels,
                cache=cache,
            )
        except (ImageDecodeError, ImageLocationError) as failure:
            tiles.append(Tile(None, lines, reason or str(failure)))
        else:
            tiles.append(Tile(jpeg, lines))
    return tiles


def _locations(rows: pd.DataFrame, id_col: str) -> tuple[list[object], list[object], dict[str, str]]:
    """Each row's image offset and size: as recorded in ``rows`` (null: no image), else, without those columns,
    from a header-only pass of each row's tar; None where the row's sample has no image member or its tar cannot
    be read (the tars that cannot be, with the reason, are the third item)."""
    unreadable: dict[str, str] = {}
    if OFFSET in rows.columns and SIZE in rows.columns:
        return list(rows[OFFSET]), list(rows[SIZE]), unreadable
    offsets: list[object] = [None] * len(rows)
    sizes: list[object] = [None] * len(rows)
    by_tar = pd.Series(range(len(rows)), dtype="int64").groupby(rows["tar_url"].to_numpy(), sort=False)
    for tar_url, positions in by_tar:
        ids = rows[id_col].iloc[positions.to_numpy()].drop_duplicates()
        try:
            located = image_locations(str(tar_url), RowKeys(ids, str(tar_url)), len(ids))
        except ShardReadError as error:
            unreadable[str(tar_url)] = str(error)
            continue
        where = dict(zip(ids, range(len(ids)), strict=True))
        for position in positions:
            index = where[rows[id_col].iloc[position]]
            if located.found[index]:
                offsets[position], sizes[position] = int(located.offsets[index]), int(located.sizes[index])
    return offsets, sizes, unreadable


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value))


def _line(column: str, value: object, id_col: str) -> str:
    if isinstance(value, float | np.floating):
        value = f"{value:.3f}"
    return str(value) if column == id_col else f"{column}: {value}"

"""Look at a dataset's rows: ``show`` (any rows as a thumbnail grid) and ``duplicate_groups`` (what dedup removed,
beside what it kept), both rendered inline in Jupyter with no server (``images.gallery``).

Rows are found in their shards by the shard's stem (or tar URL) and the row's id: search results name both.
The columns shown under each image (caption, image locations, the reason a row has no embedding) are read from
the dataset for the shards shown only.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pandas as pd

from dask_clip.arguments import at_least, one_of
from dask_clip.errors import ColumnError, DataError, UsageError
from dask_clip.execution import ShardTask, compute
from dask_clip.images.gallery import OFFSET, SIZE, ThumbnailGrid, Tile, row_tiles
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import ThumbnailCache, thumbnail
from dask_clip.io.shards import discover_shards, filesystem_of

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

STEM = "stem"
TAR_URL = "tar_url"
ERRORS = ("embedding_error", "error_message")
"""Where a row's reason for having no image is: its embedding's error, else img2dataset's download error."""
SORTS = ("size", "similarity")
DEDUP_COLUMNS = ("keep", "duplicate_of", "duplicate_of_shard", "similarity")
CONTAMINATION_COLUMNS = ("decontaminated", "contamination_match", "contamination_similarity")


def show(
    frame: pd.DataFrame,
    dataset: ImageTextPairDataset | None = None,
    columns: Sequence[str] | None = None,
    max_side: int = 160,
    *,
    error_columns: Sequence[str] = ERRORS,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cache: ThumbnailCache | None = None,
) -> ThumbnailGrid:
    """``frame``'s rows as a grid of thumbnails (at most ``max_side`` px), each with the values of ``columns``
    under it (default: caption, score, id, stem, where present); Jupyter shows the grid inline.

    ``frame`` names each row's id (``dataset.id_col``, ``"key"`` without a dataset) and its shard, by ``tar_url``
    or ``stem`` (``dataset.search`` gives both); ``dataset`` supplies the rest: the tar of a ``stem``, captions,
    ``image_offset``/``image_size`` and ``error_columns``, for the shards shown. With a dataset, a frame without
    shard columns (``dataset.metadata.compute().head()``) is matched by id alone, which must then be unique.
    Rows are located by a pass over their tars' headers when there are no ``image_offset``/``image_size``
    columns; a row without an image shows why (the first of its ``error_columns`` it has, or the reason the image
    cannot be read). ``cache`` holds the thumbnails (``ThumbnailCache()`` by default: the user's cache folder).
    """
    at_least("max_side", max_side)
    id_col = dataset.id_col if dataset is not None else "key"
    rows = _with_dataset_columns(frame, dataset, error_columns) if dataset is not None else _with_stems(frame)
    columns = list(columns) if columns is not None else ["caption", "score", id_col, STEM]
    tiles = row_tiles(
        rows,
        id_col,
        columns,
        error_columns=error_columns,
        max_side=max_side,
        max_image_pixels=max_image_pixels,
        cache=cache,
    )
    return ThumbnailGrid(tuple(tiles), rows, max_side)


@dataclass(frozen=True)
class DuplicateGroups:
    """The duplicate groups that ``duplicate_groups`` picked, in order: ``frames`` (one pandas frame each: the
    kept row first, then the rows removed as its duplicates) and ``grids`` (their thumbnails); ``total`` groups
    matched before the first ``n`` were taken. Iterating gives the frames; Jupyter shows the grids."""

    frames: tuple[pd.DataFrame, ...]
    grids: tuple[ThumbnailGrid, ...]
    total: int
    what: str = "duplicate groups"

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> pd.DataFrame:
        return self.frames[index]

    def _repr_html_(self) -> str:
        heading = f"<p>{len(self.frames)} of {self.total} {self.what}</p>"
        return heading + "".join(f'<div style="margin-bottom:1em">{g._repr_html_()}</div>' for g in self.grids)

    def __repr__(self) -> str:
        title = f"DuplicateGroups({len(self.frames)} of {self.total} {self.what})"
        return "\n".join([title, *map(repr, self.grids)])


def duplicate_groups(
    dataset: ImageTextPairDataset,
    n: int = 10,
    sort: str = "size",
    min_similarity: float | None = None,
    *,
    max_removed: int | None = None,
    max_side: int = 128,
    cache: ThumbnailCache | None = None,
) -> DuplicateGroups:
    """The first ``n`` groups of rows that deduplication (``ExactDeduplicator``, ``SemanticDeduplicator``) made,
    read from the dataset's ``keep``, ``duplicate_of``, ``duplicate_of_shard`` and ``similarity`` columns.

    A group is a kept row and every row removed as its duplicate, also through another removed row (a semantic
    duplicate may name a removed row as its closest match). ``min_similarity`` keeps only removed rows whose
    recorded similarity is at least that (a preview of a tighter ``eps``: ``1 - eps``), and the groups left with
    any. ``sort="size"``: most removed rows first; ``"similarity"``: the lowest similarity first (the groups
    nearest the cut-off, the ones to look at before trusting ``eps``). Ties go by the kept row's shard and id.

    Each group's frame has the stem, id, ``role`` (``"kept"`` then ``"removed"``, by similarity, highest first),
    ``similarity``, ``duplicate_of`` and the shown columns. ``ColumnError`` names the missing columns when the
    dataset was not deduplicated. ``max_removed`` caps the removed rows each grid shows (the most similar; the
    frames hold them all).
    """
    at_least("n", n)
    one_of("sort", sort, SORTS)
    missing = [column for column in DEDUP_COLUMNS if column not in dataset.meta.columns]
    if missing:
        raise ColumnError(
            f"{dataset.path}: duplicate_groups reads columns {missing}, which the dataset lacks: deduplicate it "
            "first (ExactDeduplicator or SemanticDeduplicator, or `dask-clip dedup`) and save its metadata"
        )
    id_col = dataset.id_col
    removed = shard_rows(dataset, [id_col, "duplicate_of", "duplicate_of_shard", "similarity"], removed_only=True)
    removed["kept_stem"], removed["kept_id"] = _kept_rows(removed, id_col)
    if min_similarity is not None:
        removed = removed[removed["similarity"].astype("float64") >= min_similarity]
    groups = [group for _, group in removed.groupby(["kept_stem", "kept_id"], sort=True)]
    if sort == "size":
        groups.sort(key=len, reverse=True)
    else:
        groups.sort(key=lambda group: group["similarity"].astype("float64").min())
    frames = [_group_frame(group, id_col) for group in groups[:n]]
    if not frames:
        return DuplicateGroups((), (), len(groups))
    joined = _with_dataset_columns(pd.concat(frames, ignore_index=True), dataset, ERRORS)
    frames = [joined.iloc[start : start + len(frame)] for start, frame in zip(_starts(frames), frames, strict=True)]
    shown = [frame.head(1 + max_removed) if max_removed is not None else frame for frame in frames]
    lines = _group_lines(id_col)
    tiles = row_tiles(pd.concat(shown), id_col, lines, error_columns=ERRORS, max_side=max_side, cache=cache)
    grids = []
    for start, frame, rows in zip(_starts(shown), frames, shown, strict=True):
        kept = f"{frame[STEM].iloc[0]}/{frame[id_col].iloc[0]}"
        title = f"kept {kept}: {len(frame) - 1} removed"
        group_tiles = tuple(tiles[start : start + len(rows)])
        grids.append(ThumbnailGrid(group_tiles, rows.reset_index(drop=True), max_side, title))
    frames = [frame.reset_index(drop=True) for frame in frames]
    return DuplicateGroups(tuple(frames), tuple(grids), len(groups))


def contamination_matches(
    dataset: ImageTextPairDataset,
    n: int = 10,
    *,
    max_side: int = 128,
    cache: ThumbnailCache | None = None,
) -> DuplicateGroups:
    """The first ``n`` training rows that decontamination (``decontaminate``) flagged, each beside the evaluation
    item it matched, lowest similarity first (the pairs nearest the threshold, to look at before trusting it; ties
    by stem and id), read from the ``decontaminated``, ``contamination_match`` and ``contamination_similarity``
    columns and the evaluation set the first's provenance records.

    Each pair's frame has the stem, id, ``role`` (``"training"``, then ``"evaluation"``), ``similarity`` and the
    evaluation item's ``name``; its grid shows the training image and the evaluation image (an image of an
    evaluation folder or dataset; an embeddings file has none to show). ``ColumnError`` names the missing columns
    when the dataset was not decontaminated.
    """
    at_least("n", n)
    missing = [column for column in CONTAMINATION_COLUMNS if column not in dataset.meta.columns]
    if missing:
        raise ColumnError(
            f"{dataset.path}: contamination_matches reads columns {missing}, which the dataset lacks: decontaminate "
            "it first (decontaminate, or `dask-clip decontaminate`)"
        )
    keep, match, similarity = CONTAMINATION_COLUMNS
    id_col = dataset.id_col
    flagged = shard_rows(dataset, [id_col, match, similarity], removed_only=True, keep_column=keep)
    flagged = flagged.assign(similarity=flagged[similarity].astype("float64"), name=flagged[match].astype(str))
    total = len(flagged)
    flagged = flagged.sort_values(["similarity", STEM, id_col], kind="stable").head(n)
    if not total:
        return DuplicateGroups((), (), 0, "contamination matches")
    against = (dataset.operation_config(keep) or {}).get("against", {})
    training = _with_dataset_columns(flagged[[STEM, id_col, "similarity", "name"]], dataset, ERRORS)
    tiles = row_tiles(
        training, id_col, ["similarity", id_col, STEM], error_columns=ERRORS, max_side=max_side, cache=cache
    )
    frames, grids = [], []
    for position, (_, row) in enumerate(training.iterrows()):
        pair = pd.DataFrame(
            {
                STEM: [row[STEM], None],
                id_col: [row[id_col], None],
                "role": ["training", "evaluation"],
                "similarity": [row["similarity"], row["similarity"]],
                "name": [row["name"], row["name"]],
            }
        )
        evaluation = _evaluation_tile(against, row["name"], id_col, max_side)
        title = f"{row[STEM]}/{row[id_col]} matches {row['name']}"
        frames.append(pair)
        grids.append(ThumbnailGrid((tiles[position], evaluation), pair, max_side, title))
    return DuplicateGroups(tuple(frames), tuple(grids), total, "contamination matches")


def _evaluation_tile(against: dict[str, object], name: str, id_col: str, max_side: int) -> Tile:
    """The thumbnail of the evaluation item ``name`` of the evaluation set that provenance records as ``against``:
    an image of its folder, or a row of its dataset (``<stem>/<id>``); a placeholder saying why where there is none."""
    lines = ("evaluation", name)
    kind, path = against.get("kind"), str(against.get("path"))
    try:
        if kind == "images":
            fs, root = filesystem_of(path)
            with fs.open(posixpath.join(root, name), "rb") as file:
                return Tile(thumbnail(file.read(), max_side), lines)
        if kind == "dataset":
            stem, key = name.split("/", 1)
            tar = {shard.stem: shard.tar_url for shard in discover_shards(path)}[stem]
            row = pd.DataFrame({TAR_URL: [tar], id_col: [key]})
            return replace(row_tiles(row, id_col, [], max_side=max_side)[0], lines=lines)
    except (OSError, KeyError, DataError) as error:
        return Tile(None, lines, f"{path}: {error}")
    return Tile(None, lines, "an embeddings file holds no image")


def _starts(frames: Sequence[pd.DataFrame]) -> list[int]:
    """Where each of ``frames`` starts in their concatenation."""
    return [sum(len(frame) for frame in frames[:index]) for index in range(len(frames))]


def _group_lines(id_col: str) -> list[str]:
    """The columns shown under each image of a duplicate group."""
    return ["role", "similarity", id_col, STEM, "caption"]


def _kept_rows(removed: pd.DataFrame, id_col: str) -> tuple[list[object], list[object]]:
    """The kept row (stem, id) at the end of each removed row's chain of ``duplicate_of`` matches."""
    match = {
        (stem, key): (of_stem, of_key)
        for stem, key, of_stem, of_key in zip(
            removed[STEM], removed[id_col], removed["duplicate_of_shard"], removed["duplicate_of"], strict=True
        )
    }
    stems, ids = [], []
    for row in match:
        seen = {row}
        while row in match and match[row] not in seen:
            row = match[row]
            seen.add(row)
        stems.append(row[0])
        ids.append(row[1])
    return stems, ids


def _group_frame(group: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """A group's rows: the kept one, then those removed, most similar first (ties by stem and id)."""
    kept = pd.DataFrame({STEM: [group["kept_stem"].iloc[0]], id_col: [group["kept_id"].iloc[0]], "role": ["kept"]})
    removed = group.assign(role="removed", similarity=group["similarity"].astype("float64"))
    removed = removed.sort_values(["similarity", STEM, id_col], ascending=[False, True, True], kind="stable")
    columns = [STEM, id_col, "role", "similarity", "duplicate_of"]
    frame = pd.concat([kept, removed[columns]], ignore_index=True)
    return frame.astype({id_col: group[id_col].dtype})


def _with_stems(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``stem`` column (from its ``tar_url`` when it has none); ``UsageError`` without either."""
    if TAR_URL not in frame.columns:
        raise UsageError(
            f"show() without a dataset needs each row's tar in column {TAR_URL!r} (dataset.search gives it); the "
            f"frame's columns are {list(frame.columns)}: pass the dataset too"
        )
    if STEM in frame.columns:
        return frame.reset_index(drop=True)
    stems = [os.path.basename(str(url)).removesuffix(".tar") for url in frame[TAR_URL]]
    return frame.assign(**{STEM: stems}).reset_index(drop=True)


def _with_dataset_columns(
    frame: pd.DataFrame, dataset: ImageTextPairDataset, error_columns: Sequence[str]
) -> pd.DataFrame:
    """``frame``'s rows with their ``stem`` and ``tar_url`` and, where ``frame`` lacks them, the dataset's caption,
    image location and ``error_columns`` values, joined by shard and id (by id alone when ``frame`` names no shard)."""
    id_col = dataset.id_col
    if id_col not in frame.columns:
        raise ColumnError(f"show() finds rows by their id: the frame has no column {id_col!r}")
    wanted = [c for c in ("caption", OFFSET, SIZE, *error_columns) if c in dataset.meta.columns]
    wanted = [c for c in wanted if c not in frame.columns]
    by_stem = {shard.stem: position for position, shard in enumerate(dataset.shards)}
    if STEM in frame.columns or TAR_URL in frame.columns:
        frame = _with_stems(frame) if STEM not in frame.columns else frame.reset_index(drop=True)
        unknown = sorted(set(frame[STEM]) - set(by_stem))
        if unknown:
            raise UsageError(f"{dataset.path}: no shards {unknown[:5]} in the dataset (stems are {list(by_stem)[:5]})")
        positions = sorted({by_stem[stem] for stem in frame[STEM]})
        found = shard_rows(dataset, [id_col, *wanted], positions=positions)
        keys = [STEM, id_col]
    else:
        found = shard_rows(dataset, [id_col, *wanted])
        repeated = found[found.duplicated(id_col, keep=False) & found[id_col].isin(frame[id_col])]
        if len(repeated):
            raise UsageError(
                f"{dataset.path}: ids {list(repeated[id_col].unique()[:5])} are in more than one shard; give the "
                f"frame a {STEM!r} column to say which"
            )
        keys = [id_col]
        frame = frame.reset_index(drop=True)
    found = found.drop(columns=[c for c in (STEM, TAR_URL) if c in frame.columns and c not in keys])
    return frame.merge(found.astype({id_col: frame[id_col].dtype}), on=keys, how="left", validate="many_to_one")


def shard_rows(
    dataset: ImageTextPairDataset,
    columns: list[str],
    positions: Sequence[int] | None = None,
    removed_only: bool = False,
    keep_column: str = "keep",
) -> pd.DataFrame:
    """``columns`` of the rows of the shards at ``positions`` (default: all) with their ``stem`` and ``tar_url``,
    computed on the cluster; ``removed_only``: the rows whose ``keep_column`` is False only."""
    meta = dataset.meta[columns].assign(**{STEM: pd.Series([], dtype=object), TAR_URL: pd.Series([], dtype=object)})
    rows = dataset.map_shards(
        _rows_of_shard,
        meta,
        label="review-rows",
        positions=positions,
        columns=columns,
        removed_only=removed_only,
        keep_column=keep_column,
    )
    return compute(rows).reset_index(drop=True)


def _rows_of_shard(
    rows: pd.DataFrame, task: ShardTask, columns: list[str], removed_only: bool, keep_column: str
) -> pd.DataFrame:
    if removed_only:
        rows = rows[rows[keep_column].eq(False).fillna(False).to_numpy(dtype=bool)]
    return rows[columns].assign(**{STEM: task.shard.stem, TAR_URL: task.shard.tar_url})


DECISIONS = ("keep_top_fraction", "keep_near_target")
"""The functions whose recorded decision has a score and a side: ``decision_boundary`` shows them."""


@dataclass(frozen=True)
class Decision:
    """How a decision column was made: ``column`` (bool) ranks rows by ``score`` (largest first when ``largest``),
    True for the first ones; ``threshold`` is the score found or given (None: no threshold, as DataComp's pool
    clusters); ``summary`` says the step in words."""

    column: str
    score: str
    largest: bool
    threshold: float | None
    summary: str


def recorded_decisions(dataset: ImageTextPairDataset) -> list[Decision]:
    """The decision columns of ``dataset`` whose record names a score and a side (``DECISIONS``), in column order."""
    configs = {column: dataset.operation_config(column) or {} for column in dataset.provenance}
    found = []
    for column, config in configs.items():
        function = config.get("function")
        if function == "keep_top_fraction":
            side = "top" if config["largest"] else "bottom"
            summary = f"{side} {config['fraction']} by {config['column']}: {config.get('kept_rows')} of "
            summary += f"{config.get('scored_rows')} scored rows kept, threshold {config.get('threshold')}"
            found.append(Decision(column, config["column"], config["largest"], config.get("threshold"), summary))
        elif function == "keep_near_target" and pd.api.types.is_bool_dtype(dataset.meta[column].dtype):
            floats = (c for c, other in configs.items() if other == config and is_float(dataset.meta[c].dtype))
            score = next(floats, None)  # the similarity the same run wrote
            if score is not None:
                rule = (
                    f"cosine >= {config['threshold']}" if config["mode"] == "centroids" else "DataComp's pool clusters"
                )
                summary = f"near {config['target']['source']} ({config['mode']}, k={config['k']}: {rule})"
                found.append(Decision(column, score, True, config.get("threshold"), summary))
    return found


@dataclass(frozen=True)
class DecisionBoundary:
    """The rows on either side of a ``decision``'s boundary: ``kept`` (the kept rows ranked last, the last nearest
    the boundary) and ``dropped`` (the rows not kept ranked first, the first nearest it), as frames and ``grids``
    (their thumbnails: kept, then dropped). Jupyter shows them side by side."""

    decision: Decision
    kept: pd.DataFrame
    dropped: pd.DataFrame
    grids: tuple[ThumbnailGrid, ThumbnailGrid]

    def _repr_html_(self) -> str:
        import html

        sides = "".join(f'<div style="flex:1;min-width:0">{grid._repr_html_()}</div>' for grid in self.grids)
        return (
            f"<p><b>{html.escape(self.decision.column)}</b>: {html.escape(self.decision.summary)}</p>"
            f'<div class="dask-clip-boundary" style="display:flex;gap:2em">{sides}</div>'
        )

    def __repr__(self) -> str:
        return "\n".join([f"DecisionBoundary({self.decision.column}: {self.decision.summary})", *map(repr, self.grids)])


def boundary_rows(rows: pd.DataFrame, decision: Decision, id_col: str, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Of ``rows`` (with the decision's column and score, and ``id_col``), the ``n`` kept rows ranked last and the
    ``n`` rows not kept ranked first, by score (the decision's side), then id; rows without a score left out."""
    scored = rows[rows[decision.score].notna() & rows[decision.column].notna()]
    ranked = scored.sort_values([decision.score, id_col], ascending=[not decision.largest, True], kind="stable")
    kept = ranked[decision.column].astype(bool).to_numpy()
    return ranked[kept].tail(n).reset_index(drop=True), ranked[~kept].head(n).reset_index(drop=True)


def decision_boundary(
    dataset: ImageTextPairDataset,
    column: str,
    n: int = 8,
    *,
    rows: pd.DataFrame | None = None,
    max_side: int = 128,
    cache: ThumbnailCache | None = None,
) -> DecisionBoundary:
    """The ``n`` rows each side of the boundary of decision ``column`` (a top fraction's, or an image-based
    filter's: ``recorded_decisions``), with their thumbnails: where a fraction's threshold fell, which images just
    made it and which just missed. ``rows``: the dataset's rows with the columns needed, when already computed.
    ``ColumnError`` when ``column`` records no such decision."""
    at_least("n", n)
    decision = next((found for found in recorded_decisions(dataset) if found.column == column), None)
    if decision is None:
        named = [found.column for found in recorded_decisions(dataset)]
        raise ColumnError(f"column {column!r} records no decision with a score (one of {DECISIONS}); these do: {named}")
    if rows is None:
        rows = shard_rows(dataset, [dataset.id_col, decision.column, decision.score])
    kept, dropped = boundary_rows(rows, decision, dataset.id_col, n)
    lines = [decision.score, dataset.id_col, STEM]
    titles = (f"last {len(kept)} kept", f"first {len(dropped)} not kept")
    grids = tuple(
        dataclasses.replace(show(frame, dataset, lines, max_side, cache=cache), title=title)
        for frame, title in zip((kept, dropped), titles, strict=True)
    )
    return DecisionBoundary(decision, kept, dropped, grids)


def is_float(dtype: object) -> bool:
    """Whether ``dtype`` is a floating-point type (False for types pandas cannot judge)."""
    try:
        return pd.api.types.is_float_dtype(dtype)
    except TypeError:
        return False

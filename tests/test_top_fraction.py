"""keep_top_fraction: exactly ceil(f*n) of the n scored rows kept over every shard, ties by (id, shard stem), the
same whatever the sharding; nulls kept or not as asked; the threshold recorded, found again when the data change,
and refused by consumers when the shards' files disagree about it."""

from __future__ import annotations

import itertools
import math
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ImageTextPairDataset, TopFractionFilter, combine_decisions, keep_by_threshold, keep_top_fraction
from dask_clip.errors import ColumnError, MixedProvenanceError, UsageError
from dask_clip.ops import top_fraction

COLUMN = "keep_top_fraction"


def write_scored_shards(folder: Path, frames: list[pd.DataFrame]) -> Path:
    """Shards whose parquets pandas wrote (another tool: no dask_clip footer), with empty tars."""
    folder.mkdir(parents=True)
    for number, frame in enumerate(frames):
        frame.to_parquet(folder / f"{number:05d}.parquet", index=False)
        tarfile.open(folder / f"{number:05d}.tar", "w").close()
    return folder


def tied_scores(rows: int, seed: int) -> pd.DataFrame:
    """``rows`` rows of unique string ids and scores among 0..3 (many ties), one in seven null."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, rows).astype("float64")
    scores[::7] = np.nan
    ids = [f"k{i:04d}" for i in rng.permutation(rows)]
    return pd.DataFrame({"key": ids, "score": scores})


def split(frame: pd.DataFrame, shards: int) -> list[pd.DataFrame]:
    bounds = np.linspace(0, len(frame), shards + 1).astype(int)
    return [frame.iloc[start:end].reset_index(drop=True) for start, end in itertools.pairwise(bounds)]


def decided(dataset: ImageTextPairDataset, column: str = COLUMN) -> pd.DataFrame:
    frame = dataset.metadata.compute()
    return frame.assign(**{column: frame[column].astype(bool)}).set_index("key")


def expected_kept(frame: pd.DataFrame, fraction: float, largest: bool) -> set[str]:
    """The ids a sort of the scored rows by (score, id) keeps: the first ceil(fraction * n)."""
    scored = frame.dropna(subset=["score"])
    ordered = scored.sort_values(["score", "key"], ascending=[not largest, True])
    return set(ordered["key"][: math.ceil(Fraction(str(fraction)) * len(scored))])


@pytest.mark.parametrize("largest", [True, False])
def test_exactly_ceil_f_n_rows_are_kept_with_ties_settled_by_id(tmp_path: Path, largest: bool) -> None:
    frame = tied_scores(90, seed=1)
    dataset = ImageTextPairDataset.from_webdataset(str(write_scored_shards(tmp_path / "shards", split(frame, 4))))
    scored = int(frame["score"].notna().sum())
    for fraction in (0.01, 0.1, 0.3, 0.5, 0.77, 1.0):
        result = decided(keep_top_fraction(dataset, "score", fraction, largest=largest))
        kept = set(result.index[result[COLUMN]])
        assert len(kept) == math.ceil(Fraction(str(fraction)) * scored), fraction
        assert kept == expected_kept(frame, fraction, largest), fraction
    assert len(set(result.index[result[COLUMN]])) == scored  # 1.0: every scored row, no null one


def test_the_decision_is_the_same_however_the_rows_are_sharded(tmp_path: Path) -> None:
    frame = tied_scores(60, seed=2)
    kept = []
    for shards, seed in ((1, 0), (3, 1), (7, 2)):
        shuffled = frame.sample(frac=1, random_state=seed)  # other shards, rows in another order
        folder = write_scored_shards(tmp_path / f"{shards}", split(shuffled, shards))
        result = decided(keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.3))
        kept.append(set(result.index[result[COLUMN]]))
    assert kept[0] == kept[1] == kept[2] == expected_kept(frame, 0.3, largest=True)


def test_an_id_in_two_shards_is_settled_by_the_shard_stem(tmp_path: Path) -> None:
    same = pd.DataFrame({"key": ["a", "b"], "score": [1.0, 1.0]})
    folder = write_scored_shards(tmp_path / "shards", [same, same, same])
    dataset = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.5)
    assert dataset.metadata.compute()[COLUMN].tolist() == [True, False] * 3  # every 'a' before any 'b'
    recorded = dataset.provenance[COLUMN].operation
    assert (recorded["last_tied_id"], recorded["last_tied_shard"], recorded["kept_rows"]) == ("a", "00002", 3)


def test_null_scores_are_kept_or_not_as_asked_and_never_counted(tmp_path: Path) -> None:
    frame = pd.DataFrame({"key": list("abcdef"), "score": [3.0, None, 1.0, np.nan, 2.0, 0.0]})
    dataset = ImageTextPairDataset.from_webdataset(str(write_scored_shards(tmp_path / "shards", split(frame, 2))))
    dropped = decided(keep_top_fraction(dataset, "score", 0.5))
    assert dropped[COLUMN].to_dict() == dict(a=True, b=False, c=False, d=False, e=True, f=False)
    kept = decided(keep_top_fraction(dataset, "score", 0.5, keep_missing=True))
    assert kept[COLUMN].to_dict() == dict(a=True, b=True, c=False, d=True, e=True, f=False)
    none = pd.DataFrame({"key": ["x", "y"], "score": [np.nan, np.nan]})
    empty = ImageTextPairDataset.from_webdataset(str(write_scored_shards(tmp_path / "none", [none])))
    nothing = keep_top_fraction(empty, "score", 0.3, keep_missing=True)
    assert decided(nothing)[COLUMN].tolist() == [True, True]
    assert nothing.provenance[COLUMN].operation["threshold"] is None


def test_bad_fractions_columns_and_sizes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = tied_scores(20, seed=3).assign(caption="a caption", flag=True)
    dataset = ImageTextPairDataset.from_webdataset(str(write_scored_shards(tmp_path / "shards", split(frame, 2))))
    for fraction in (0, -0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(UsageError, match=r"fraction must be a number greater than 0 and at most 1"):
            keep_top_fraction(dataset, "score", fraction)
    for column in ("caption", "flag"):
        with pytest.raises(ColumnError, match=rf"column '{column}' is .*, not a numeric score"):
            keep_top_fraction(dataset, column, 0.3)
    with pytest.raises(ColumnError, match=r"reads columns \['nope'\]"):
        keep_top_fraction(dataset, "nope", 0.3)
    monkeypatch.setattr(top_fraction, "MAX_EXACT_ROWS", 19)
    with pytest.raises(UsageError, match=r"ranks at most 19 rows exactly, and .* has 20; no approximate \(sketch\)"):
        keep_top_fraction(dataset, "score", 0.3)


def test_another_tools_integer_ids_and_float32_scores(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for number, (ids, scores) in enumerate((([5, 3, 9], [0.5, 0.25, None]), ([1, 7], [0.5, 0.75]))):
        table = pa.table({"id": pa.array(ids, pa.int64()), "clip_l14": pa.array(scores, pa.float32())})
        pq.write_table(table, folder / f"{number:05d}.parquet")
        tarfile.open(folder / f"{number:05d}.tar", "w").close()
    dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="id")
    result = keep_top_fraction(dataset, "clip_l14", 0.5)  # ceil(0.5 * 4) = 2: 0.75, then the 0.5 of id 1 before 5
    kept = result.metadata.compute().set_index("id")[COLUMN].to_dict()
    assert kept == {5: False, 3: False, 9: False, 1: True, 7: True}
    assert result.provenance[COLUMN].operation["last_tied_id"] == 1


def test_the_threshold_is_recorded_and_found_again_when_the_data_change(client, tmp_path: Path) -> None:
    frame = pd.DataFrame({"key": [f"r{i}" for i in range(9)], "score": [float(i) for i in range(9)]})
    folder = write_scored_shards(tmp_path / "shards", split(frame, 3))
    first = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.3, keep_missing=True)
    assert first.provenance[COLUMN].operation == {
        "function": "keep_top_fraction",
        "column": "score",
        "fraction": 0.3,
        "largest": True,
        "keep_missing": True,
        "threshold": 6.0,
        "last_tied_id": "r6",
        "last_tied_shard": "00002",
        "scored_rows": 9,
        "kept_rows": 3,
    }
    assert first.save_metadata()["written"].all()
    again = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.3, keep_missing=True)
    assert not again.save_metadata()["written"].any()  # the same threshold over the same data: nothing to do

    table = pq.read_table(folder / "00000.parquet")  # another tool rescored shard 00000, keeping the footer
    table = table.set_column(table.schema.get_field_index("score"), "score", pa.array([10.0, 11.0, 12.0]))
    pq.write_table(table, folder / "00000.parquet")
    with pytest.raises(MixedProvenanceError, match=r"decided for other inputs .* 1 shard \(00000\)") as raised:
        ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(str(tmp_path / "out"), filter_column=COLUMN)
    assert f"dask-clip filter {folder} --column score --top-fraction 0.3 --keep-missing" in str(raised.value)
    rerun = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.3, keep_missing=True)
    assert rerun.provenance[COLUMN].operation["threshold"] == 10.0  # ranked again over every shard
    assert rerun.save_metadata()["written"].all()  # a decision across shards: every shard's file is rewritten
    kept = ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(str(tmp_path / "out"), filter_column=COLUMN)
    assert int(kept["rows"].sum()) == 3


def test_shards_decided_with_two_fractions_are_refused(client, tmp_path: Path) -> None:
    frame = tied_scores(30, seed=4)
    folder = write_scored_shards(tmp_path / "shards", split(frame, 3))
    keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.3).save_metadata()
    other = tmp_path / "second-run"  # a re-run with 0.5, killed after its first file
    keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.5).save_metadata(str(other))
    shutil.copyfile(other / "00000.parquet", folder / "00000.parquet")
    with pytest.raises(MixedProvenanceError, match=r"to_webdataset reads 'keep_top_fraction'.*fraction=0\.5"):
        ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(str(tmp_path / "out"), filter_column=COLUMN)
    with pytest.raises(MixedProvenanceError, match=r"CombineDecisions reads 'keep_top_fraction'"):
        combine_decisions(ImageTextPairDataset.from_webdataset(str(folder)), [COLUMN])  # a step refuses it too
    finished = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(folder)), "score", 0.5).save_metadata()
    assert finished["written"].all()


def test_the_operation_records_itself_by_its_function() -> None:
    operation = TopFractionFilter("clip_score", 0.3)
    assert operation.recorded_config() == {
        "function": "keep_top_fraction",
        "column": "clip_score",
        "fraction": 0.3,
        "largest": True,
        "keep_missing": False,
    }


def test_cli_keeps_the_top_clip_scores_end_to_end(cli, embedded_shards: Path, model_with_tokenizer: Path, tmp_path):
    folder, model = str(embedded_shards), str(model_with_tokenizer)
    top = cli("filter", folder, "--by", "clip-score", "--model-dir", model, "--top-fraction", "0.3")
    assert top.returncode == 0, top.stderr
    assert "filter by clip_score over 3 shards: 18 rows, 13 marked keep_top_fraction=False (threshold" in top.stdout
    assert ": 5 of 15 scored rows kept)" in top.stdout  # ceil(0.3 * 15); the 3 failed downloads have no score
    saved = ImageTextPairDataset.from_webdataset(folder).metadata.compute()
    scores = saved["clip_score"].astype("float64")
    assert scores[saved[COLUMN].astype(bool)].min() >= scores[~saved[COLUMN].astype(bool)].max()

    bottom = cli("filter", folder, "--column", "clip_score", "--top-fraction", "0.2", "--smallest", "--keep-missing")
    assert bottom.returncode == 0, bottom.stderr
    assert "12 marked keep_top_fraction=False" in bottom.stdout  # ceil(0.2 * 15) = 3 kept, and the 3 unscored rows
    reshard = cli("reshard", folder, str(tmp_path / "kept"), "--filter-column", COLUMN)
    assert reshard.returncode == 0, reshard.stderr
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "kept").glob("*.parquet")) == 6

    both = cli("filter", folder, "--column", "clip_score", "--top-fraction", "0.3", "--min", "0")
    assert both.returncode == 2 and "give --top-fraction or --min/--max, not both" in both.stderr
    bad = cli("filter", folder, "--column", "clip_score", "--top-fraction", "0")
    assert bad.returncode == 2 and "fraction must be a number greater than 0" in bad.stderr


def test_decisions_are_combined_into_a_column_of_their_own(tmp_path: Path) -> None:
    frame = pd.DataFrame({"key": list("abcdef"), "score": [5.0, 4.0, 3.0, 2.0, 1.0, None]})
    dataset = ImageTextPairDataset.from_webdataset(str(write_scored_shards(tmp_path / "shards", split(frame, 2))))
    top = keep_top_fraction(dataset, "score", 0.5, keep_missing=True)  # a, b, c and the unscored f
    both = keep_by_threshold(top, "score", max=4.5)  # b, c, d, e
    combined = combine_decisions(both, [COLUMN, "keep_by_threshold"])
    kept = decided(combined, "curated")
    assert kept["curated"].to_dict() == dict(a=False, b=True, c=True, d=False, e=False, f=False)
    assert kept[COLUMN]["a"] and kept["keep_by_threshold"]["e"]  # each decision stays as it was made
    recorded = {"function": "combine_decisions", "columns": [COLUMN, "keep_by_threshold"]}
    assert combined.provenance["curated"].operation == recorded
    assert set(combined.provenance["curated"].reads) == {COLUMN, "keep_by_threshold"}
    with pytest.raises(UsageError, match="one of the decisions combined"):
        combine_decisions(both, [COLUMN], keep_column=COLUMN)
    with pytest.raises(ColumnError, match=r"column 'score' is .*, not a boolean decision"):
        combine_decisions(both, [COLUMN, "score"])

"""Vector layouts on disk (``io.vectors``): every layout dask_clip ever wrote reads the same, a change of layout
never re-embeds, and a dataset half in the old layout (``fixed_size_list``, as dask_clip wrote before) and half in
the new (``list<float32>``, the width in the footer) is usable by every operation."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, SemanticDeduplicator, embeddings_to_numpy, testing
from dask_clip.dataset.plan import read_output_file
from dask_clip.errors import ConfigurationError, ShardMetadataError, UsageError
from dask_clip.io.vectors import check_writable, to_memory


def written_before(parquet: Path, column: str = "image_embedding") -> None:
    """Rewrite ``parquet`` (as dask_clip writes it now) as dask_clip wrote it before: the column a
    ``fixed_size_list<float32>[D]``, the same provenance, and no word of a layout or a width in the footer."""
    table = pq.read_table(parquet)
    width = json.loads(table.schema.metadata[b"dask_clip.widths"])[column]
    fixed = to_memory(table, {column: width})
    metadata = dict(fixed.schema.metadata)
    del metadata[b"dask_clip.widths"]
    document = json.loads(metadata[b"dask_clip"])
    del document["vectors"]
    metadata[b"dask_clip"] = json.dumps(document, sort_keys=True).encode()
    index = fixed.schema.get_field_index(column)
    fixed = fixed.set_column(index, fixed.schema.field(column).remove_metadata(), fixed.column(index))
    pq.write_table(fixed.replace_schema_metadata(metadata), parquet)


def layout_in(parquet: Path, column: str = "image_embedding") -> tuple[pa.DataType, str | None]:
    schema = pq.read_schema(parquet)
    vectors = json.loads(schema.metadata[b"dask_clip"]).get("vectors", {})
    return schema.field(column).type, vectors.get(column, {}).get("layout")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="embeds: no torch here (ci/floor.sh)")
def test_half_old_half_new_stays_finished_and_usable(
    client, embedded_shards: Path, model_with_tokenizer: Path, tmp_path: Path
) -> None:
    embedder = ClipImageEmbedder(str(model_with_tokenizer), autocast=False)
    assert layout_in(embedded_shards / "00001.parquet") == (pa.list_(pa.float32()), "list")
    before = ImageTextPairDataset.from_webdataset(str(embedded_shards)).metadata.compute()
    for stem in ("00000", "00003"):  # the first shard (whose footer gives the dataset its types) and the last
        written_before(embedded_shards / f"{stem}.parquet")
    assert layout_in(embedded_shards / "00000.parquet") == (pa.list_(pa.float32(), 32), None)

    again = embedder(ImageTextPairDataset.from_webdataset(str(embedded_shards))).save_metadata()
    assert not again["written"].any(), "a change of layout alone never re-embeds"

    dataset = ImageTextPairDataset.from_webdataset(str(embedded_shards))
    assert dataset.meta["image_embedding"].dtype.pyarrow_dtype == pa.list_(pa.float32(), 32)
    assert dataset.embedding_width("image_embedding") == 32
    frame = dataset.metadata.compute()
    np.testing.assert_array_equal(
        embeddings_to_numpy(frame["image_embedding"]), embeddings_to_numpy(before["image_embedding"])
    )
    assert frame["image_embedding"].isna().sum() == 3
    assert dataset.info()["shards"].sum() == 3 if "shards" in dataset.info() else len(dataset.info())

    query = embeddings_to_numpy(frame["image_embedding"])[0]
    assert dataset.search(image=query, k=3)["key"].iloc[0] == frame["key"].iloc[0]
    dataset.build_index(str(tmp_path / "index"))
    assert dataset.search(image=query, k=3, index=str(tmp_path / "index"))["key"].iloc[0] == frame["key"].iloc[0]
    exported = dataset.export_clip_retrieval(str(tmp_path / "export"))
    assert exported["rows"].sum() == 15
    deduplicated = SemanticDeduplicator(n_clusters=1)(dataset)
    deduplicated.save_metadata(str(tmp_path / "dedup"), columns=["keep"])
    assert pq.read_table(tmp_path / "dedup" / "00003.parquet").column("keep").null_count == 0
    resharded = dataset.to_webdataset(str(tmp_path / "reshard"), samples_per_shard=7)
    assert resharded["rows"].tolist() == [7, 7, 4]
    assert layout_in(tmp_path / "reshard" / "00000.parquet") == (pa.list_(pa.float32()), "list")
    back = ImageTextPairDataset.from_webdataset(str(tmp_path / "reshard")).metadata.compute()
    assert back["image_embedding"].isna().sum() == 3

    dataset.save_metadata(overwrite=True)  # converts to the default layout, computing nothing
    assert layout_in(embedded_shards / "00000.parquet") == (pa.list_(pa.float32()), "list")
    current = ImageTextPairDataset.from_webdataset(str(embedded_shards))
    assert current.open_index(str(tmp_path / "index")).manifest["column"] == "image_embedding"  # same embeddings

    current.save_metadata(str(tmp_path / "f16"), vector_layout="float16")  # rounded: not taken for an edit
    for tar in embedded_shards.glob("*.tar"):
        shutil.copyfile(tar, tmp_path / "f16" / tar.name)
    assert layout_in(tmp_path / "f16" / "00000.parquet") == (pa.list_(pa.float16()), "float16")
    assert read_output_file(str(tmp_path / "f16" / "00000.parquet"), "key", ["image_embedding"]).changed == []
    ImageTextPairDataset.from_webdataset(str(tmp_path / "f16")).build_index(str(tmp_path / "index16"))


VECTORS = {
    "a": np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32),
    "b": None,
    "c": np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32),
    "d": np.array([0.0, 0.6, 0.8, 0.0], dtype=np.float32),
    "e": None,
}


@pytest.mark.parametrize(
    ("layout", "on_disk"),
    [
        ("list", pa.list_(pa.float32())),
        ("fixed_size_list", pa.list_(pa.float32(), 4)),
        ("float16", pa.list_(pa.float16())),
    ],
)
def test_each_layout_is_named_in_the_footer_and_reads_back(layout: str, on_disk: pa.DataType, tmp_path: Path) -> None:
    if layout == "fixed_size_list" and int(pa.__version__.split(".")[0]) < 26:
        pytest.skip(
            "fixed_size_list with null rows needs pyarrow 26 (refused before: test_fixed_size_needs_pyarrow_26)"
        )
    testing.write_embedding_shards(tmp_path / "in", VECTORS, rows_per_shard=3)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    dataset.save_metadata(str(tmp_path / "out"), vector_layout=layout)
    for parquet in sorted((tmp_path / "out").glob("*.parquet")):
        assert layout_in(parquet) == (on_disk, layout)
        shutil.copyfile(tmp_path / "in" / f"{parquet.stem}.tar", tmp_path / "out" / f"{parquet.stem}.tar")
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet")))  # pyarrow 26
    assert [v is None for v in table.column("image_embedding").to_pylist()] == [v is None for v in VECTORS.values()]

    back = ImageTextPairDataset.from_webdataset(str(tmp_path / "out"))
    assert back.meta["image_embedding"].dtype.pyarrow_dtype == pa.list_(pa.float32(), 4)
    vectors = embeddings_to_numpy(back.metadata.compute(scheduler="threads")["image_embedding"])
    expected = np.array([np.full(4, np.nan) if v is None else v for v in VECTORS.values()], dtype=np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-3 if layout == "float16" else 0)


def test_a_row_of_another_width_than_the_footer_says_names_the_file(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "in", VECTORS, rows_per_shard=5)
    ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).save_metadata(overwrite=True)
    parquet = tmp_path / "in" / "00000.parquet"
    table = pq.read_table(parquet)
    edited = pa.array([[1.0, 2.0], None, [0.0] * 4, [0.0] * 4, None], type=table.schema.field(1).type)
    pq.write_table(table.set_column(1, table.schema.field(1), edited), parquet)
    with pytest.raises(ShardMetadataError, match=r"00000.parquet: column 'image_embedding': row 0 holds 2 values"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).metadata.compute(scheduler="threads")


def test_fixed_size_needs_pyarrow_26(tmp_path: Path) -> None:
    check_writable("fixed_size_list", "26.0.0")
    check_writable("list", "16.0.0")
    with pytest.raises(ConfigurationError, match=r"'fixed_size_list' needs pyarrow 26 or later \(this is 25.0.1\)"):
        check_writable("fixed_size_list", "25.0.1")
    if int(pa.__version__.split(".")[0]) < 26:  # in the floor environment (ci/floor.sh): refused before any work
        parquet = testing.write_embedding_shards(tmp_path / "in", VECTORS, rows_per_shard=5)[0]
        before = parquet.read_bytes()
        with pytest.raises(ConfigurationError, match="needs pyarrow 26"):
            ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).save_metadata(vector_layout="fixed_size_list")
        assert parquet.read_bytes() == before, "nothing is written"


def test_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "in", VECTORS, rows_per_shard=5)
    with pytest.raises(UsageError, match=r"vector_layout must be one of \('list', 'fixed_size_list', 'float16'\)"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).save_metadata(vector_layout="fixed")


def test_commands_that_save_take_a_vector_layout() -> None:
    from dask_clip.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["reshard", "in", "out", "--vector-layout", "float16"]).vector_layout == "float16"
    assert parser.parse_args(["dedup", "in", "--vector-layout", "fixed_size_list"]).vector_layout == "fixed_size_list"
    with pytest.raises(SystemExit):
        parser.parse_args(["reshard", "in", "out", "--vector-layout", "fixed"])

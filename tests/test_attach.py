"""Embeddings users already have, in clip-retrieval's layout (LAION's published embeddings, or an export):
attached to the shards' rows by id or by url, without embedding again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dask_clip import (
    ColumnError,
    DataError,
    DatasetLayoutError,
    ImageTextPairDataset,
    SemanticDeduplicator,
    embeddings_to_numpy,
)


@pytest.fixture
def embedded(embedded_shards: Path) -> Path:
    """The session's embedded shards, copied: the attach command writes next to them."""
    return embedded_shards


def vectors_of(frame: pd.DataFrame, key: str = "key") -> dict[str, np.ndarray]:
    vectors = embeddings_to_numpy(frame["image_embedding"])
    return {k: v for k, v in zip(frame[key], vectors, strict=True) if not np.isnan(v).all()}


def test_an_export_attached_back_gives_the_same_vectors(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    bare = tmp_path / "bare"
    shutil.copytree(embedded, bare)
    for parquet in bare.glob("*.parquet"):  # the shards as img2dataset wrote them: no embeddings
        table = pq.read_table(parquet)
        pq.write_table(
            table.drop_columns(["image_embedding", "embedding_error"]).replace_schema_metadata(None), parquet
        )

    attached = ImageTextPairDataset.from_webdataset(str(bare)).attach_embeddings(str(exported))
    frame = attached.metadata.compute()
    original = ImageTextPairDataset.from_webdataset(str(embedded)).metadata.compute()
    expected = {k: v.astype(np.float16).astype(np.float32) for k, v in vectors_of(original).items()}  # export's float16
    got = vectors_of(frame)
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=key)
    missing = frame[frame["image_embedding"].isna()]
    assert len(missing) == 3 and missing["embedding_error"].str.startswith("no vector for this row in").all()

    summary = attached.save_metadata()
    assert summary["written"].all()
    again = ImageTextPairDataset.from_webdataset(str(bare)).attach_embeddings(str(exported)).save_metadata()
    assert not again["written"].any(), "attached embeddings were not recognised as finished"
    result = SemanticDeduplicator(n_clusters=2)(ImageTextPairDataset.from_webdataset(str(bare))).metadata.compute()
    assert result["keep"].notna().all()  # curation runs on the attached embeddings


def test_vectors_attach_by_url_where_the_ids_differ(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    for metadata in (exported / "metadata").glob("*.parquet"):  # another dataset's ids for the same images
        table = pq.read_table(metadata).to_pandas()
        table["key"] = "laion-" + table["key"]
        table.to_parquet(metadata, index=False)
    frame = (
        ImageTextPairDataset.from_webdataset(str(embedded))
        .attach_embeddings(str(exported), on="url", embedding_column="laion_embedding", error_column="laion_error")
        .metadata.compute()
    )
    assert frame["laion_embedding"].notna().sum() == 15
    both = frame[frame["laion_embedding"].notna()]
    np.testing.assert_allclose(
        embeddings_to_numpy(both["laion_embedding"]), embeddings_to_numpy(both["image_embedding"]), atol=1e-3
    )


def test_a_key_with_two_vectors_and_a_broken_layout_are_named(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    shutil.copy(exported / "img_emb" / "img_emb_0.npy", exported / "img_emb" / "img_emb_3.npy")
    shutil.copy(exported / "metadata" / "metadata_0.parquet", exported / "metadata" / "metadata_3.parquet")
    dataset = ImageTextPairDataset.from_webdataset(str(embedded))
    with pytest.raises(DataError, match=r"has more than one vector \(.*metadata_0\.parquet row 0, .*metadata_3"):
        dataset.attach_embeddings(str(exported)).metadata.compute(scheduler="threads")
    (exported / "metadata" / "metadata_3.parquet").unlink()
    with pytest.raises(DatasetLayoutError, match=r"without their metadata, or the reverse: \['3'\]"):
        dataset.attach_embeddings(str(exported))


def test_the_attach_command_saves_next_to_the_shards(cli, embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    result = cli("attach", str(embedded), str(exported), "--embedding-column", "attached")
    assert result.returncode == 0, result.stderr
    assert "attached 15 vectors to 18 rows of 3 shards" in result.stdout
    assert "attached" in pq.read_schema(embedded / "00001.parquet").names


# Vectors made up for the shards' own keys, in clip-retrieval's layout: the cases below need no model.


def dataset_keys(shards: Path) -> list[str]:
    return [key for parquet in sorted(shards.glob("*.parquet")) for key in pq.read_table(parquet)["key"].to_pylist()]


def write_clip_retrieval(
    folder: Path, parts: list[tuple[list[str], np.ndarray]], key_column: str = "key"
) -> dict[str, np.ndarray]:
    """``img_emb/img_emb_{i}.npy`` and ``metadata/metadata_{i}.parquet`` for each part (its keys, its vectors,
    saved as they are); returns each key's vector, where the part has as many vectors as keys."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for index, (keys, vectors) in enumerate(parts):
        np.save(folder / "img_emb" / f"img_emb_{index}.npy", vectors)
        pd.DataFrame({key_column: keys, "caption": [f"caption of {k}" for k in keys]}).to_parquet(
            folder / "metadata" / f"metadata_{index}.parquet"
        )
    return {k: v for keys, vectors in parts if len(keys) == len(vectors) for k, v in zip(keys, vectors, strict=True)}


def random_vectors(rows: int, seed: int = 0, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def file_states(shards: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(shards.iterdir())}


def assert_attached(shards: Path, expected: dict[str, np.ndarray]) -> None:
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    got = vectors_of(frame)
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_array_equal(got[key], vector.astype(np.float32), err_msg=key)


@pytest.mark.parametrize(("vector_rows", "metadata_rows"), [(16, 14), (14, 16)], ids=["more-vectors", "fewer-vectors"])
def test_a_part_whose_vectors_and_metadata_rows_differ_is_refused_before_anything_is_written(
    shards: Path, tmp_path: Path, vector_rows: int, metadata_rows: int
) -> None:
    keys = dataset_keys(shards)
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(keys[:metadata_rows], random_vectors(vector_rows)), (keys[16:], random_vectors(2, 1))])
    before = file_states(shards)
    message = rf"img_emb_0\.npy: holds {vector_rows} vectors but .*metadata_0\.parquet has {metadata_rows} rows"
    with pytest.raises(DataError, match=message):
        ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    assert file_states(shards) == before


@pytest.mark.parametrize(
    "vectors",
    [
        np.arange(6 * 8).reshape(6, 8),
        random_vectors(6).astype(np.complex64) * 1j,
        random_vectors(6) > 0,
        np.arange(6, dtype=np.float32),
        random_vectors(6).reshape(6, 2, 4),
    ],
    ids=["int64", "complex64", "bool", "1-d", "3-d"],
)
def test_vectors_that_are_not_rows_of_real_floats_are_refused(
    shards: Path, tmp_path: Path, vectors: np.ndarray
) -> None:
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(dataset_keys(shards)[:6], vectors)])
    before = file_states(shards)
    message = rf"img_emb_0\.npy: holds an array of {vectors.dtype} with shape \({vectors.shape[0]},"
    with pytest.raises(DataError, match=message) as raised:
        ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    assert "float16, float32 or float64" in str(raised.value)
    assert file_states(shards) == before


def test_a_truncated_npy_is_named_before_anything_is_written(shards: Path, tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(dataset_keys(shards)[:6], random_vectors(6))])
    npy = emb / "img_emb" / "img_emb_0.npy"
    npy.write_bytes(npy.read_bytes()[:-40])
    before = file_states(shards)
    with pytest.raises(DataError, match=r"img_emb_0\.npy: its header says 6 rows of 8 float32 \(192 bytes\)"):
        ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    assert file_states(shards) == before


def test_fortran_order_and_float64_vectors_attach_as_their_rows(shards: Path, tmp_path: Path) -> None:
    keys = dataset_keys(shards)
    emb = tmp_path / "emb"
    fortran = np.asfortranarray(random_vectors(10).astype(np.float64))
    expected = write_clip_retrieval(emb, [(keys[:10], fortran), (keys[10:], random_vectors(8, 1).astype(np.float16))])
    assert np.load(emb / "img_emb" / "img_emb_0.npy").flags.f_contiguous
    ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    assert_attached(shards, expected)


def test_a_source_column_the_metadata_lacks_is_refused(shards: Path, tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(dataset_keys(shards), random_vectors(18))])
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ColumnError, match=r"metadata_0\.parquet: no column 'sample_id' to join on; its columns are"):
        dataset.attach_embeddings(str(emb), source_column="sample_id")


def test_clip_retrievals_own_inference_output_attaches_by_image_path(cli, shards: Path, tmp_path: Path) -> None:
    """clip-retrieval's inference over a WebDataset writes float16 vectors and, in its metadata, the sample's
    ``__key__`` as ``image_path`` (and ``caption``), without a ``key`` column."""
    keys = dataset_keys(shards)
    emb = tmp_path / "emb"
    parts = [(keys[:10], random_vectors(10).astype(np.float16)), (keys[10:], random_vectors(8, 1).astype(np.float16))]
    expected = write_clip_retrieval(emb, parts, key_column="image_path")
    attached = ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb))
    assert attached.provenance["image_embedding"].operation["source_column"] == "image_path"
    result = cli("attach", str(shards), str(emb))
    assert result.returncode == 0, result.stderr
    assert (
        "attached 18 vectors to 18 rows of 3 shards (0 without a vector), joined on key = metadata's image_path"
        in result.stdout
    )
    assert_attached(shards, expected)


def test_the_attach_command_refuses_misaligned_vectors_with_exit_1(cli, shards: Path, tmp_path: Path) -> None:
    keys = dataset_keys(shards)
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(keys[:12], random_vectors(12)), (keys[12:], random_vectors(4, 1))])
    before = file_states(shards)
    result = cli("attach", str(shards), str(emb))
    assert result.returncode == 1, result.stderr
    assert "img_emb_1.npy: holds 4 vectors but" in result.stderr and "metadata_1.parquet has 6 rows" in result.stderr
    assert "Traceback" not in result.stderr
    assert file_states(shards) == before


def test_an_npy_rewritten_with_its_size_and_mtime_kept_is_read_again(shards: Path, tmp_path: Path) -> None:
    keys = dataset_keys(shards)
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(keys, random_vectors(18))])
    ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    npy = emb / "img_emb" / "img_emb_0.npy"
    kept = npy.stat()
    rewritten = random_vectors(18, seed=7)
    np.save(npy, rewritten)
    os.utime(npy, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it
    assert (npy.stat().st_size, npy.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)

    summary = ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(str(emb)).save_metadata()
    assert summary["written"].all(), "the rewritten vectors were taken as the ones attached before"
    assert_attached(shards, dict(zip(keys, rewritten, strict=True)))


def test_one_folder_under_any_spelling_is_one_source(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb = tmp_path / "emb"
    write_clip_retrieval(emb, [(dataset_keys(shards), random_vectors(18))])
    (tmp_path / "link").symlink_to(emb)
    monkeypatch.chdir(tmp_path)
    first = ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings("emb").save_metadata()
    assert first["written"].all()
    for spelling in (str(emb), "emb/", f"{emb}/", "./link", "link/../emb"):
        again = ImageTextPairDataset.from_webdataset(str(shards)).attach_embeddings(spelling).save_metadata()
        assert not again["written"].any(), f"{spelling!r} was taken for another source than 'emb'"

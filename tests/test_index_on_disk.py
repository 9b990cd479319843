"""Index format 2: the IVF lists in one file on disk and the ids in an Arrow file, both memory-mapped when opened;
an index of format 1, or an incomplete folder, is refused; ids of every type come back as they were."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ImageTextPairDataset, IndexFileError, UsageError, ann, testing
from dask_clip.dataset import index as index_module
from dask_clip.dataset.index_files import merge_ids, write_ids

WIDTH = 16


def clustered(count: int, seed: int) -> np.ndarray:
    """``float32 (count, WIDTH)`` vectors around 40 directions, as embeddings of similar images cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, WIDTH))
    return (centres[rng.integers(0, 40, count)] + 0.35 * rng.standard_normal((count, WIDTH))).astype(np.float32)


@pytest.fixture
def built(client, tmp_path: Path) -> tuple[ImageTextPairDataset, Path]:
    """4 shards of 1,000 clustered rows, indexed as ``IVF64,Flat``."""
    vectors = clustered(4000, seed=1)
    testing.write_embedding_shards(tmp_path / "shards", {f"k{i:05d}": v for i, v in enumerate(vectors)}, 1000)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    dataset.build_index(str(tmp_path / "index"), index_key="IVF64,Flat", nprobe=8, seed=3)
    return dataset, tmp_path / "index"


def test_the_lists_stay_on_disk_and_every_list_scanned_is_exact_search(built, capfd) -> None:
    dataset, folder = built
    opened = dataset.open_index(str(folder))
    assert ann.lists_on_disk(opened.index) and opened.manifest["index"]["lists"] == "on_disk"
    # the client's index file holds the quantizer and the lists' offsets; the vectors are in lists.ivfdata
    assert (folder / "index.faiss").stat().st_size < 64 * WIDTH * 4 + 64 * 64
    assert (folder / "lists.ivfdata").stat().st_size >= 4000 * (WIDTH * 4 + 8)
    for query in clustered(10, seed=2):
        exact = dataset.search(image=query, k=10)
        approximate = dataset.search(image=query, k=10, index=opened, nprobe=64)
        assert approximate["key"].tolist() == exact["key"].tolist()
        np.testing.assert_allclose(approximate["score"], exact["score"], atol=1e-5)
        assert approximate["stem"].tolist() == exact["stem"].tolist()
    assert "ondisk" not in capfd.readouterr().out  # faiss's progress prints stay out of the output


def test_a_moved_index_folder_finds_its_lists(built, tmp_path: Path) -> None:
    dataset, folder = built
    query = clustered(1, seed=5)[0]
    before = dataset.search(image=query, k=5, index=str(folder))
    shutil.move(folder, tmp_path / "moved")
    assert dataset.search(image=query, k=5, index=str(tmp_path / "moved")).equals(before)


def test_an_index_of_format_1_is_refused_with_rebuild(built) -> None:
    dataset, folder = built
    manifest = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(UsageError, match=r"an index of format 1 .* reads format 2 .* rebuild the index"):
        dataset.open_index(str(folder))


def test_an_incomplete_folder_never_opens(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, folder = built
    lists = folder / "lists.ivfdata"
    size = lists.stat().st_size
    with lists.open("r+b") as file:
        file.truncate(size // 2)  # a copy cut short
    with pytest.raises(IndexFileError, match=rf"lists\.ivfdata: {size // 2} bytes, where .* records {size}"):
        dataset.open_index(str(folder))
    (folder / "index.json").unlink()  # the manifest is written last: a folder without it holds no index
    with pytest.raises(UsageError, match="no index here"):
        dataset.open_index(str(folder))

    def killed(*args) -> None:
        (Path(args[2]).parent / "lists.ivfdata").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "_merge_parts", killed)  # a build stopped while merging
    with pytest.raises(KeyboardInterrupt):
        dataset.build_index(str(tmp_path / "stopped"))
    assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".stopped.*"))
    with pytest.raises(UsageError, match="no index here"):
        dataset.open_index(str(tmp_path / "stopped"))


def write_int_id_shards(folder: Path, vectors: np.ndarray, rows_per_shard: int) -> None:
    """Shards whose id column ``key`` is ``int64`` (written by pyarrow, as another tool would), empty tars."""
    folder.mkdir()
    for shard, start in enumerate(range(0, len(vectors), rows_per_shard)):
        block = vectors[start : start + rows_per_shard]
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), WIDTH)
        keys = pa.array(np.arange(start, start + len(block), dtype=np.int64) * 7 + 1_000_000_000_000)
        pq.write_table(pa.table({"key": keys, "image_embedding": column}), folder / f"{shard:05d}.parquet")
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            archive.addfile(tarfile.TarInfo("empty.txt"), io.BytesIO(b""))


def test_integer_ids_round_trip(client, tmp_path: Path) -> None:
    """Ids of int64 come back as exact search gives them, past a shard with no usable vector (an empty batch)."""
    vectors = clustered(3000, seed=4)
    vectors[1000:2000] = 0  # shard 00001: nothing indexed
    write_int_id_shards(tmp_path / "shards", vectors, 1000)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    summary = dataset.build_index(str(tmp_path / "index"), index_key="IVF16,Flat")
    assert summary["indexed"].tolist() == [1000, 0, 1000]
    for query in clustered(5, seed=6):
        exact = dataset.search(image=query, k=7)
        approximate = dataset.search(image=query, k=7, index=str(tmp_path / "index"), nprobe=16)
        assert approximate["key"].tolist() == exact["key"].tolist() and approximate["key"].dtype == exact["key"].dtype


def test_id_parts_merge_into_one_file_with_one_type(tmp_path: Path) -> None:
    """Parts whose ids read as ``string``, ``large_string`` or (no row indexed) ``null`` merge into one
    ``string`` file, by ascending labels, one batch per part."""

    def part(name: str, labels: list[int], ids: pa.Array) -> str:
        shard = pa.array(np.full(len(labels), int(name[-1]), dtype=np.int32))
        write_ids(pa.table({"label": pa.array(labels, pa.int64()), "shard": shard, "key": ids}), str(tmp_path / name))
        return str(tmp_path / name)

    parts = [
        part("p0", [], pa.array([], pa.null())),
        part("p1", [3, 5], pa.array(["a", "b"], pa.string())),
        part("p2", [10], pa.array(["c"], pa.large_string())),
    ]
    merge_ids(parts, str(tmp_path / "ids.arrow"))
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "ids.arrow"))).read_all()
    assert table.schema.field("key").type == pa.string()
    assert table.column("label").to_pylist() == [3, 5, 10] and table.column("key").to_pylist() == ["a", "b", "c"]
    assert table.column("shard").to_pylist() == [1, 1, 2]


def ivf_parts(tmp_path: Path, key: str) -> tuple[faiss.Index, list[str], np.ndarray]:
    """A trained empty ``key`` index of ``WIDTH``-d clustered vectors and 3 parts of 1,600 of them (one empty),
    written as ``build_index``'s workers write them (quantizer emptied); the vectors."""
    vectors = clustered(1600, seed=7)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    trained = ann.train(ann.choose_index(len(vectors), WIDTH, 2**30, key), vectors, seed=0)
    paths = []
    for number, (start, stop) in enumerate([(0, 700), (700, 700), (700, 1600)]):
        part = ann.add(faiss.clone_index(trained), vectors[start:stop], np.arange(start, stop) * 3)
        paths.append(str(tmp_path / f"part{number}.faiss"))
        faiss.write_index(ann.without_quantizer(part), paths[-1])
    return trained, paths, vectors


def list_contents(index: faiss.Index, list_no: int) -> tuple[bytes, list[int]]:
    lists = faiss.extract_index_ivf(index).invlists
    size = lists.list_size(list_no)
    codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).tobytes() if size else b""
    return codes, faiss.rev_swig_ptr(lists.get_ids(list_no), size).tolist() if size else []


@pytest.mark.parametrize("key", ["IVF16,Flat", "IVF16,SQ8", "IVF16,PQ4x4"])
def test_lists_merged_on_disk_hold_what_a_merge_in_memory_holds(tmp_path: Path, key: str) -> None:
    trained, paths, vectors = ivf_parts(tmp_path, key)
    on_disk, in_memory = faiss.clone_index(trained), faiss.clone_index(trained)
    ann.merge_on_disk(on_disk, paths, str(tmp_path / "lists.ivfdata"))
    for start, stop in [(0, 700), (700, 700), (700, 1600)]:  # the parts with their quantizers
        ann.merge_into(in_memory, ann.add(faiss.clone_index(trained), vectors[start:stop], np.arange(start, stop) * 3))
    assert ann.lists_on_disk(on_disk) and on_disk.ntotal == in_memory.ntotal == 1600
    for list_no in range(16):
        assert list_contents(on_disk, list_no) == list_contents(in_memory, list_no)
    written = tmp_path / "index.faiss"
    faiss.write_index(on_disk, str(written))
    found = ann.search(ann.read_on_disk(str(written)), vectors[:50], 10, 4)
    expected = ann.search(in_memory, vectors[:50], 10, 4)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_search_lets_go_of_the_lists_pages_past_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained, paths, vectors = ivf_parts(tmp_path, "IVF16,Flat")
    ann.merge_on_disk(trained, paths, str(tmp_path / "lists.ivfdata"))
    faiss.write_index(trained, str(tmp_path / "index.faiss"))
    del trained  # its own mapping of the lists, gone
    index = ann.read_on_disk(str(tmp_path / "index.faiss"))
    expected = index.search(vectors[:200], 10, params=faiss.SearchParametersIVF(nprobe=16))  # every list, mapped
    assert mapped_kb(tmp_path / "lists.ivfdata") > 0
    monkeypatch.setattr(ann, "MAPPED_LISTS_BYTES", 1)  # any page held is too many: one query per batch
    found = ann.search(index, vectors[:200], 10, 16)
    assert mapped_kb(tmp_path / "lists.ivfdata") == 0
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])


def mapped_kb(path: Path) -> int:
    """The resident kB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith(f" {path}")]
    assert starts, f"{path} is not mapped"
    return sum(int(next(line for line in lines[i + 1 :] if line.startswith("Rss:")).split()[1]) for i in starts)

"""Consumers check provenance: nothing reads a derived column that the shards' files say was produced by two
runs, over other inputs, or for other rows. The half-finished states are those a killed run leaves: one file
of the second run in place, the others still of the first (made here by saving the second run into another
folder and moving one of its files in, which is what a run killed after its first rename leaves)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dask_clip import (
    AestheticClassifier,
    ClipImageEmbedder,
    ImageTextPairDataset,
    SemanticDeduplicator,
    clip_score,
    keep_by_threshold,
    keep_top_fraction,
    testing,
)
from dask_clip.errors import DataError, MixedProvenanceError
from dask_clip.models.classifiers import AestheticMlp


def dataset_of(folder: Path) -> ImageTextPairDataset:
    return ImageTextPairDataset.from_webdataset(str(folder))


def move_in(run_output: Path, folder: Path, stem: str) -> None:
    """Put the file a second run wrote for ``stem`` in place, as a run killed after its first rename leaves it."""
    shutil.copyfile(run_output / f"{stem}.parquet", folder / f"{stem}.parquet")


# --- a semantic dedup re-run with other options, killed after its first file -------------------------------------
def planted_vectors() -> dict[str, np.ndarray]:
    """Three shards of four 16-d vectors; a0 and b0, a1 and b1 are near-copies across shards 00000 and 00001."""
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((10, 16))
    copies = distinct[:2] + 0.001 * rng.standard_normal((2, 16))
    keys = ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3", "c0", "c1", "c2", "c3"]
    vectors = [distinct[0], distinct[1], distinct[2], distinct[3], copies[0], copies[1], *distinct[4:10]]
    return dict(zip(keys, vectors, strict=True))


def dedup(which_to_keep: str) -> SemanticDeduplicator:
    return SemanticDeduplicator(n_clusters=1, eps=0.01, which_to_keep=which_to_keep)


@pytest.fixture
def half_deduplicated(client, tmp_path: Path) -> Path:
    """``keep`` of a ``hard`` dedup in 00001 and 00002, of an ``easy`` one (killed after its first file) in 00000."""
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, planted_vectors(), rows_per_shard=4)
    dedup("hard")(dataset_of(folder)).save_metadata()
    dedup("easy")(dataset_of(folder)).save_metadata(str(tmp_path / "second-run"))
    move_in(tmp_path / "second-run", folder, "00000")
    return folder


def kept_per_pair(folder: Path) -> list[int]:
    frame = dataset_of(folder).metadata.compute().set_index("key")
    return [int(frame.loc[a, "keep"]) + int(frame.loc[b, "keep"]) for a, b in (("a0", "b0"), ("a1", "b1"))]


def test_a_half_finished_dedup_is_reported_but_never_resharded(cli, half_deduplicated: Path, tmp_path: Path) -> None:
    assert 1 not in kept_per_pair(half_deduplicated)  # consumed as it is: each pair keeps no copy, or both
    info = cli("info", str(half_deduplicated))
    assert info.returncode == 0 and "keep (produced differently in different shards)" in info.stdout

    output = tmp_path / "kept"
    reshard = cli("reshard", str(half_deduplicated), str(output), "--filter-column", "keep")
    assert reshard.returncode == 1, reshard.stderr
    assert "MixedProvenanceError" in reshard.stderr
    assert "1 shard (00000)" in reshard.stderr and "2 shards (00001, 00002)" in reshard.stderr
    assert "which_to_keep='easy'" in reshard.stderr and "which_to_keep='hard'" in reshard.stderr
    assert f"dask-clip dedup {half_deduplicated} --method semantic" in reshard.stderr
    assert "--which-to-keep easy" in reshard.stderr and "--which-to-keep hard" in reshard.stderr
    assert not output.exists()


def test_finishing_the_dedup_makes_it_consumable(client, half_deduplicated: Path, tmp_path: Path) -> None:
    finished = dedup("easy")(dataset_of(half_deduplicated)).save_metadata()  # the dedup's own re-run is not blocked
    assert finished["written"].all()  # a cross-shard decision: every shard decided again
    assert kept_per_pair(half_deduplicated) == [1, 1]
    summary = dataset_of(half_deduplicated).to_webdataset(str(tmp_path / "kept"), filter_column="keep")
    assert int(summary["rows"].sum()) == 10


def test_a_filter_refuses_a_half_finished_keep_and_resumes_its_own(client, half_deduplicated: Path) -> None:
    with pytest.raises(MixedProvenanceError, match=r"ThresholdFilter reads '(similarity|keep)'"):
        keep_by_threshold(dataset_of(half_deduplicated), "similarity", max=0.999, keep_missing=True, keep_column="keep")
    dedup("hard")(dataset_of(half_deduplicated)).save_metadata()
    # a filter killed after its first file: its own keep in 00000, the dedup's in the others
    other = half_deduplicated.parent / "filter-run"
    keep_by_threshold(
        dataset_of(half_deduplicated), "similarity", max=0.999, keep_missing=True, keep_column="keep"
    ).save_metadata(str(other))
    move_in(other, half_deduplicated, "00000")
    with pytest.raises(MixedProvenanceError, match=r"to_webdataset reads 'keep'"):
        dataset_of(half_deduplicated).to_webdataset(str(half_deduplicated.parent / "out"), filter_column="keep")
    resumed = keep_by_threshold(
        dataset_of(half_deduplicated), "similarity", max=0.999, keep_missing=True, keep_column="keep"
    )
    resumed.save_metadata()  # the same filter again finishes its own run
    dataset_of(half_deduplicated).to_webdataset(str(half_deduplicated.parent / "out"), filter_column="keep")


def test_decisions_made_for_other_inputs_are_refused(client, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, planted_vectors(), rows_per_shard=4)
    dedup("hard")(dataset_of(folder)).save_metadata()
    table = pq.read_table(folder / "00002.parquet")
    pq.write_table(table.slice(1), folder / "00002.parquet")  # a row removed since: the decisions are not current
    with pytest.raises(MixedProvenanceError, match=r"decided for other inputs than the shards hold now") as raised:
        dataset_of(folder).to_webdataset(str(tmp_path / "out"), filter_column="keep")
    assert "00002" in str(raised.value) and "dask-clip dedup" in str(raised.value)


def test_a_shard_that_lacks_the_column_is_named(client, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, planted_vectors(), rows_per_shard=4)
    dedup("hard")(dataset_of(folder)).save_metadata(str(tmp_path / "first-run"))
    move_in(tmp_path / "first-run", folder, "00000")  # the first dedup ever, killed after its first file
    with pytest.raises(MixedProvenanceError, match=r"2 shards \(00001, 00002\): no 'keep' column"):
        dataset_of(folder).to_webdataset(str(tmp_path / "out"), filter_column="keep")


# --- columns computed in one save, one from the other -------------------------------------------------------------
def test_a_decision_saved_with_the_score_it_read_is_consumable(client, tmp_path: Path) -> None:
    """A score and the filters of it computed and saved together (``dask-clip filter --by``) are current once saved:
    their files record the score's content digest, which the filters could not know when they read it."""
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, planted_vectors(), rows_per_shard=4)
    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(16).state_dict(), weights)
    scored = AestheticClassifier(str(weights), embedding_dim=16, device="cpu")(dataset_of(folder))
    by_threshold = keep_by_threshold(scored, "aesthetic_score", min=-1e9)  # per shard
    keep_top_fraction(by_threshold, "aesthetic_score", 0.5).save_metadata()  # across shards
    saved = dataset_of(folder)
    for column, kept in (("keep_by_threshold", 12), ("keep_top_fraction", 6)):
        summary = saved.to_webdataset(str(tmp_path / column), filter_column=column)
        assert int(summary["rows"].sum()) == kept


# --- embeddings left by an interrupted switch of model -----------------------------------------------------------
@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random-weight CLIP of the same shape and width: other weights, another vector space."""
    return testing.save_random_clip_model(tmp_path_factory.mktemp("other-clip"), shape="tiny", seed=1)


def embed(folder: Path, model: Path, output: Path | None = None) -> None:
    ClipImageEmbedder(str(model), autocast=False)(dataset_of(folder)).save_metadata(str(output) if output else None)


@pytest.fixture(scope="module")
def two_models(client, pristine_shards: Path, tiny_model: Path, other_model: Path, tmp_path_factory) -> Path:
    """Embeddings of ``tiny_model`` in 00000 and 00003, of ``other_model`` in 00001 (its run killed there)."""
    root = tmp_path_factory.mktemp("two-models")
    folder = Path(shutil.copytree(pristine_shards, root / "shards"))
    embed(folder, tiny_model)
    embed(folder, other_model, root / "second-run")
    move_in(root / "second-run", folder, "00001")
    return folder


def assert_names_both_models(error: pytest.ExceptionInfo, folder: Path, tiny_model: Path, other_model: Path) -> None:
    message = str(error.value)
    assert "2 shards (00000, 00003)" in message and "1 shard (00001)" in message, message
    for model in (tiny_model, other_model):
        assert f"dask-clip embed {folder} --model-dir {model} --no-autocast" in message, message


@pytest.mark.parametrize(
    "consume",
    [
        pytest.param(lambda d, tmp: d.search(image=np.ones(32, dtype=np.float32)), id="exact search"),
        pytest.param(lambda d, tmp: d.search(text="a photo of a cat"), id="search with the recorded model"),
        pytest.param(lambda d, tmp: d.build_index(str(tmp / "index")), id="build_index"),
        pytest.param(lambda d, tmp: d.export_clip_retrieval(str(tmp / "export")), id="export"),
        pytest.param(lambda d, tmp: SemanticDeduplicator(n_clusters=2)(d), id="semantic dedup"),
        pytest.param(lambda d, tmp: d.to_webdataset(str(tmp / "reshard")), id="reshard without a filter"),
        pytest.param(
            lambda d, tmp: clip_score(d.with_metadata(d.metadata.assign(text_embedding=d.metadata["image_embedding"]))),
            id="clip_score",
        ),
    ],
)
def test_two_vector_spaces_are_never_consumed(
    consume, two_models: Path, tiny_model: Path, other_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(MixedProvenanceError, match=r"reads 'image_embedding'") as raised:
        consume(dataset_of(two_models), tmp_path)
    assert_names_both_models(raised, two_models, tiny_model, other_model)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_classifier_refuses_two_vector_spaces(
    two_models: Path, tiny_model: Path, other_model: Path, tmp_path
) -> None:
    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(32).state_dict(), weights)
    with pytest.raises(MixedProvenanceError) as raised:
        AestheticClassifier(str(weights), embedding_dim=32)(dataset_of(two_models))
    assert_names_both_models(raised, two_models, tiny_model, other_model)


def test_the_refusal_is_a_data_error_with_exit_code_1(cli, two_models: Path, tmp_path: Path) -> None:
    assert issubclass(MixedProvenanceError, DataError)
    result = cli("build-index", str(two_models), str(tmp_path / "index"))
    assert result.returncode == 1, result.stderr
    assert "MixedProvenanceError: build_index reads 'image_embedding'" in result.stderr
    assert not (tmp_path / "index").exists()


def test_finishing_the_switch_of_model_makes_it_consumable(
    client, two_models: Path, other_model: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(two_models, tmp_path / "shards"))
    embed(folder, other_model)  # the command the error names: only 00000 and 00003 are embedded again
    hits = dataset_of(folder).search(image=np.ones(32, dtype=np.float32), k=3)
    assert len(hits) == 3

"""MultiEmbedder: several models in one read of each shard, each image decoded once, each column its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, MultiEmbedder, embeddings_to_numpy, testing
from dask_clip.cli.embed import embedding_columns
from dask_clip.embedders import multi
from dask_clip.errors import UsageError
from dask_clip.provenance import FileRecords


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random CLIP with another input size (96), mean and std (0.5) than ``tiny_model`` (224, OpenAI's)."""
    folder = testing.save_random_clip_model(tmp_path_factory.mktemp("other-clip"), shape="tiny", image_size=96, seed=1)
    config_file = folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    config_file.write_text(json.dumps(config))
    return folder


def two_embedders(first: Path, second: Path, **options: Any) -> list[ClipImageEmbedder]:
    return [
        ClipImageEmbedder(str(first), embedding_column="emb_a", autocast=False, batch_size=4, **options),
        ClipImageEmbedder(str(second), embedding_column="emb_b", autocast=False, batch_size=4, **options),
    ]


class CountingDecode:
    """Wraps ``decode_opened``, counting the images it decodes."""

    def __init__(self, decode: Any) -> None:
        self.decode, self.calls = decode, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.decode(*args)


@pytest.fixture(scope="module")
def separate_runs(pristine_shards: Path, tiny_model: Path, other_model: Path) -> dict[str, Any]:
    """Each of ``two_embedders`` run alone over the pristine shards (in this process): column -> (frame, dataset)."""
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    with dask.config.set(scheduler="synchronous"):
        runs = [embedder(dataset) for embedder in two_embedders(tiny_model, other_model)]
        return {column: (run.metadata.compute(), run) for column, run in zip(("emb_a", "emb_b"), runs, strict=True)}


def test_columns_equal_separate_runs_with_one_decode_per_image(
    pristine_shards: Path,
    tiny_model: Path,
    other_model: Path,
    separate_runs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    first, second = two_embedders(tiny_model, other_model)
    assert first.preprocess.crop_height != second.preprocess.crop_height and first.preprocess.mean != (0.5,) * 3
    counting = CountingDecode(multi.decode_opened)
    monkeypatch.setattr(multi, "decode_opened", counting)
    with dask.config.set(scheduler="synchronous"):
        together = MultiEmbedder([first, second])(dataset)
        frame = together.metadata.compute()
    assert counting.calls == 15  # 15 images in the tars, each decoded once for both models
    for column, (single, run) in separate_runs.items():
        vectors, expected = embeddings_to_numpy(frame[column]), embeddings_to_numpy(single[column])
        assert np.isfinite(vectors).all(axis=1).sum() == 15
        np.testing.assert_array_equal(vectors, expected)
        assert together.provenance[column].operation == run.provenance[column].operation
    assert together.provenance["emb_a"].operation != together.provenance["emb_b"].operation
    assert together.provenance["emb_a"].reasons == {"emb_a": "emb_a_error"}
    assert frame["emb_a_error"].notna().sum() == frame["emb_b_error"].notna().sum() == 3


def test_two_embedders_writing_one_column_is_an_error_naming_both(tiny_model: Path, other_model: Path) -> None:
    with pytest.raises(
        UsageError,
        match=r"embedders\[0\] ClipImageEmbedder\(.*tiny-clip.*\) and embedders\[1\] "
        r"ClipImageEmbedder\(.*other-clip.*\) both write column 'image_embedding'",
    ):
        MultiEmbedder([ClipImageEmbedder(str(tiny_model)), ClipImageEmbedder(str(other_model))])
    clashing = ClipImageEmbedder(str(other_model), embedding_column="emb_b", error_column="emb_a")
    with pytest.raises(UsageError, match=r"embedders\[0\] .* and embedders\[1\] .* both write column 'emb_a'"):
        MultiEmbedder([ClipImageEmbedder(str(tiny_model), embedding_column="emb_a"), clashing])
    with pytest.raises(UsageError, match=r"embedders\[1\] .*decode_mode='device'"):
        MultiEmbedder([two_embedders(tiny_model, other_model)[0], _device_decoding(other_model)])


def _device_decoding(model: Path) -> ClipImageEmbedder:
    """An embedder configured for device decode without the gpu extra's check (only its configuration matters)."""
    embedder = ClipImageEmbedder(str(model), embedding_column="emb_b")
    embedder.decode_mode = "device"
    return embedder


class LoadFails(ClipImageEmbedder):
    def load_model(self) -> Any:
        raise OSError("weights truncated")


class RaisesOnBatch(ClipImageEmbedder):
    def load_model(self) -> Any:
        model = super().load_model()

        def embed(images: list[Any]) -> np.ndarray:
            raise RuntimeError("CUDA error: an illegal memory access")

        model.embed = embed
        return model


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (LoadFails, "could not be loaded on this worker: OSError: weights truncated"),
        (RaisesOnBatch, "failed on this batch"),
    ],
)
def test_a_failing_model_leaves_the_other_column_complete(
    pristine_shards: Path,
    tiny_model: Path,
    other_model: Path,
    separate_runs: dict[str, Any],
    broken: type[ClipImageEmbedder],
    reason: str,
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    good = two_embedders(tiny_model, other_model)[0]
    failing = broken(str(other_model), embedding_column="emb_b", autocast=False, batch_size=4)
    alone = separate_runs["emb_a"][0]
    with dask.config.set(scheduler="synchronous"):
        frame = MultiEmbedder([failing, good])(dataset).metadata.compute()
        np.testing.assert_array_equal(embeddings_to_numpy(frame["emb_a"]), embeddings_to_numpy(alone["emb_a"]))
        assert frame["emb_a"].notna().sum() == 15
        assert frame["emb_b"].isna().all()
        has_image = alone["emb_a"].notna()
        assert frame.loc[has_image, "emb_b_error"].str.contains(reason, regex=False).all()
        assert frame.loc[~has_image, "emb_b_error"].str.startswith("no image in the tar").all()
        failing.on_error = "raise"
        with pytest.raises(Exception, match=r"weights truncated|illegal memory access"):
            MultiEmbedder([failing, good])(dataset).metadata.compute()


def test_saved_columns_record_each_model_and_a_run_of_one_finds_them_finished(
    client, shards: Path, tiny_model: Path, other_model: Path
) -> None:
    first, second = two_embedders(tiny_model, other_model)
    MultiEmbedder([first, second])(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    records = FileRecords.from_schema(pq.read_schema(shards / "00001.parquet")).columns
    assert records["emb_a"]["operation"]["model_dir"] == str(tiny_model.resolve())
    assert records["emb_b"]["operation"]["model_dir"] == str(other_model.resolve())
    assert records["emb_b"]["reasons"] == {"emb_b": "emb_b_error"}
    before = pq.read_table(shards / "00001.parquet")
    rerun = ClipImageEmbedder(str(tiny_model), embedding_column="emb_a", error_column="emb_a_error", autocast=False)
    summary = rerun(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    assert not summary["written"].any()  # the one-model run finds what the two-model run wrote finished
    changed = ClipImageEmbedder(str(other_model), embedding_column="emb_a", error_column="emb_a_error", autocast=False)
    summary = changed(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    assert summary["written"].all()
    after = pq.read_table(shards / "00001.parquet")
    assert after["emb_b"].equals(before["emb_b"]) and not after["emb_a"].equals(before["emb_a"])


def test_cli_embeds_with_two_model_dirs(cli, shards: Path, tiny_model: Path, other_model: Path, tmp_path: Path) -> None:
    models = ["--model-dir", str(tiny_model), "--model-dir", str(other_model)]
    mismatch = cli("embed", str(shards), *models, "--column", "emb_a")
    assert mismatch.returncode == 2
    assert "2 --model-dir but 1 --column: give one --column per --model-dir" in mismatch.stderr
    output = tmp_path / "out"
    result = cli("embed", str(shards), *models, "--column", "emb_a", "--column", "emb_b", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "18 rows, 15 with an embedding, 3 without (see emb_a_error, emb_b_error)" in result.stdout
    table = pq.read_table(output / "00000.parquet")
    assert {"emb_a", "emb_a_error", "emb_b", "emb_b_error"} <= set(table.column_names)
    records = FileRecords.from_schema(table.schema).columns
    assert records["emb_b"]["operation"]["model_dir"] == str(other_model.resolve())
    again = cli("embed", str(shards), *models, "--column", "emb_a", "--column", "emb_b", "--output", str(output))
    assert "embedded 3 shards (3 already complete, skipped)" in again.stdout, again.stderr
    one_model = cli("embed", str(shards), "--model-dir", str(other_model), "--column", "emb_b", "--output", str(output))
    assert one_model.returncode == 2  # it would drop emb_a from the files: refused, nothing written
    assert "would drop derived columns that an earlier save wrote" in one_model.stderr
    assert "'emb_a'" in one_model.stderr
    assert pq.read_table(output / "00000.parquet").equals(table)


def test_default_column_names_of_several_models() -> None:
    assert embedding_columns(["m"], None) == ["image_embedding"]
    assert embedding_columns(["openai/clip-vit-base-patch32", "/models/ViT-L-14/"], None) == [
        "image_embedding_clip_vit_base_patch32",
        "image_embedding_vit_l_14",
    ]
    assert embedding_columns(["a", "b"], ["x", "y"]) == ["x", "y"]
    with pytest.raises(UsageError, match="3 --model-dir but 2 --column"):
        embedding_columns(["a", "b", "c"], ["x", "y"])

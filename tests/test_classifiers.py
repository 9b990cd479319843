"""AestheticClassifier, NsfwClassifier and keep_by_threshold on a real 2-worker LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from dask_clip import (
    AestheticClassifier,
    ImageTextPairDataset,
    NsfwClassifier,
    cache_info,
    clear_cache,
    keep_by_threshold,
    testing,
)
from dask_clip.errors import CheckpointError, ColumnError
from dask_clip.models.classifiers import AestheticMlp, NsfwMlp, read_state_dict


def random_vectors(count: int, dim: int, seed: int, missing: tuple[int, ...] = ()) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return {f"{i:04d}": None if i in missing else rng.normal(size=dim) * 3 for i in range(count)}


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray | None]:
    """11 ViT-L/14-sized vectors, not normalised (the classifier normalises), two without embedding."""
    return random_vectors(11, 768, seed=0, missing=(2, 7))


@pytest.fixture
def dataset(tmp_path: Path, vectors) -> ImageTextPairDataset:
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=4)
    return ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))


def reference(module: torch.nn.Module, vectors: dict[str, np.ndarray | None]) -> dict[str, float | None]:
    """The module itself, in eval mode, on each L2-normalised vector alone."""
    module.eval()
    out = {}
    with torch.no_grad():
        for key, vector in vectors.items():
            if vector is None:
                out[key] = None
            else:
                unit = torch.tensor(vector / np.linalg.norm(vector), dtype=torch.float32)[None]
                out[key] = float(module(unit)[0, 0])
    return out


def assert_predictions(frame: pd.DataFrame, column: str, expected: dict[str, float | None]) -> None:
    assert frame["key"].tolist() == list(expected)
    assert str(frame[column].dtype) == "float[pyarrow]"
    for key, value in zip(frame["key"], frame[column], strict=True):
        if expected[key] is None:
            assert pd.isna(value), key
        else:
            assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_scores_match_the_module(client, dataset, vectors, tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    module = AestheticMlp()
    assert sorted(module.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]  # the published layout
    path = tmp_path / f"aesthetic{suffix}"
    state = {k: v * 20 for k, v in module.state_dict().items()}  # larger weights: scores that differ clearly
    module.load_state_dict(state)
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))

    scored = AestheticClassifier(str(path), batch_size=3)(dataset)
    assert scored.metadata.npartitions == 3
    frame = scored.metadata.compute()
    expected = reference(module, vectors)
    assert_predictions(frame, "aesthetic_score", expected)
    assert len({round(v, 4) for v in expected.values() if v is not None}) > 5
    assert scored.provenance["aesthetic_score"].operation["class"] == "AestheticClassifier"


def test_nsfw_probabilities_with_keras_shaped_normalisation(client, dataset, vectors, tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = NsfwMlp()
    state = module.state_dict()
    state["norm.mean"] = torch.randn(768) * 0.01
    state["norm.variance"] = torch.rand(768) * 0.01 + 1e-4
    module.load_state_dict(state)
    keras_shaped = {**state, "norm.mean": state["norm.mean"][None], "norm.variance": state["norm.variance"][None]}
    path = tmp_path / "nsfw.safetensors"
    save_file(keras_shaped, str(path))

    frame = NsfwClassifier(str(path), batch_size=1)(dataset).metadata.compute()  # batches of one row
    expected = reference(module, vectors)
    assert_predictions(frame, "nsfw_score", expected)
    scores = frame["nsfw_score"].dropna().to_numpy(dtype=float)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_model_loads_once_per_worker(client, dataset, tmp_path: Path) -> None:
    path = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp().state_dict(), path)
    clear_cache(client)
    classifier = AestheticClassifier(str(path))
    classifier(dataset).metadata.compute()
    classifier(dataset).metadata.compute()
    counts = [
        n for per_worker in cache_info(client).values() for key, n in per_worker.items() if key.startswith("Aesthetic")
    ]
    assert counts and all(n == 1 for n in counts)


def test_wrong_embedding_size_names_both_sizes(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "shards", random_vectors(3, 32, seed=0), rows_per_shard=2)
    small = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    path = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp().state_dict(), path)
    with pytest.raises(ValueError, match=r"768-d.*'image_embedding' holds 32-d"):
        AestheticClassifier(str(path))(small)
    with pytest.raises(ColumnError, match="'clip_embedding'"):
        AestheticClassifier(str(path), embedding_column="clip_embedding")(small)


def test_bad_checkpoints_are_errors_naming_the_file(tmp_path: Path) -> None:
    """Checked when the classifier is built, on the client: nothing runs on a worker."""
    with pytest.raises(CheckpointError, match=r"missing\.pth"):
        AestheticClassifier(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "nsfw-as-aesthetic.pth"
    torch.save(NsfwMlp().state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"nsfw-as-aesthetic\.pth.*does not fit AestheticMlp"):
        AestheticClassifier(str(wrong))
    pickled = tmp_path / "whole-module.pth"
    torch.save(AestheticMlp(), pickled)  # a pickled module, not a state dict: refused by weights_only=True
    with pytest.raises(CheckpointError, match=r"whole-module\.pth"):
        AestheticClassifier(str(pickled))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(str(pickled))


def test_keep_by_threshold_marks_and_chains(client, tmp_path: Path) -> None:
    vectors = random_vectors(6, 4, seed=0, missing=(5,))
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=2)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    scores = {"0000": 1.0, "0001": 5.0, "0002": 6.5, "0003": 9.0, "0004": 5.9, "0005": None}

    def add_score(rows: pd.DataFrame) -> pd.DataFrame:
        values = pd.array([scores[k] for k in rows["key"]], dtype="float[pyarrow]")
        return rows.assign(score=pd.Series(values, index=rows.index), nsfw=pd.Series(values, index=rows.index) / 10)

    meta = add_score(dataset.metadata._meta)
    scored = dataset.with_metadata(dataset.metadata.map_partitions(add_score, meta=meta))

    pretty = keep_by_threshold(scored, "score", min=5.0)  # its own column
    assert pretty.metadata.compute()["keep_by_threshold"].tolist() == [False, True, True, True, True, False]
    own = keep_by_threshold(scored, "score", min=5.0, keep_missing=True).metadata.compute()["keep_by_threshold"]
    assert own.tolist()[-1]
    replaced = keep_by_threshold(pretty, "nsfw", max=0.6)  # its own column again: replaced, not combined
    assert replaced.metadata.compute()["keep_by_threshold"].tolist() == [True, True, False, False, True, False]
    pretty = keep_by_threshold(scored, "score", min=5.0, keep_column="keep")
    both = keep_by_threshold(pretty, "nsfw", max=0.6, keep_column="keep")  # a column named: ANDed with
    assert both.metadata.npartitions == 3
    assert both.metadata.compute()["keep"].tolist() == [False, True, False, False, True, False]
    assert both.provenance["keep"].reads["keep"] is pretty.provenance["keep"]  # the verdict it was ANDed with
    with pytest.raises(ValueError, match="min=, max="):
        keep_by_threshold(scored, "score")
    with pytest.raises(ColumnError, match="'key'"):
        keep_by_threshold(scored, "key", min=1)

"""dataset.search: exact top-k image -> image and text -> image over saved embeddings, on a 2-worker cluster."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dask_clip import ClipImageEmbedder, ColumnError, ImageTextPairDataset, UsageError, embeddings_to_numpy, testing


@pytest.fixture(scope="module")
def model_with_tokenizer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random CLIP plus a byte-level tokenizer (no tokenizer can be downloaded here)."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("clip-with-tokenizer") / "model"))
    return testing.save_tokenizer_for_clip_model(folder)


@pytest.fixture(scope="module")
def embedded(client, pristine_shards: Path, model_with_tokenizer: Path, tmp_path_factory) -> ImageTextPairDataset:
    """Shards whose parquets hold saved embeddings (15 images, 3 failed downloads), read back."""
    folder = Path(shutil.copytree(pristine_shards, tmp_path_factory.mktemp("search") / "shards"))
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    ClipImageEmbedder(str(model_with_tokenizer), autocast=False, model_inference_batch_size=8)(dataset).save_metadata()
    return ImageTextPairDataset.from_webdataset(str(folder))


def brute_force(dataset: ImageTextPairDataset, query: np.ndarray) -> list[tuple[str, float]]:
    frame = dataset.metadata.compute()
    vectors = embeddings_to_numpy(frame["image_embedding"])
    present = ~np.isnan(vectors).any(axis=1)
    scores = vectors[present] @ (query / np.linalg.norm(query))
    return sorted(zip(frame["key"][present], scores.tolist(), strict=True), key=lambda pair: (-pair[1], pair[0]))


def test_vector_query_matches_brute_force(embedded: ImageTextPairDataset) -> None:
    query = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    hits = embedded.search(image=query, k=4)
    expected = brute_force(embedded, query)[:4]
    assert hits["key"].tolist() == [key for key, _ in expected]
    np.testing.assert_allclose(hits["score"], [score for _, score in expected], atol=1e-5)
    for key, stem, tar_url in zip(hits["key"], hits["stem"], hits["tar_url"], strict=True):
        assert key.startswith(stem) and tar_url == str(Path(embedded.path) / f"{stem}.tar")


def test_k_larger_than_the_dataset_returns_every_embedded_row(embedded: ImageTextPairDataset) -> None:
    hits = embedded.search(image=np.ones(32, dtype=np.float32), k=100)
    assert len(hits) == 15 and hits["key"].is_unique
    assert hits["score"].is_monotonic_decreasing


def test_image_query_finds_itself_first_whatever_its_form(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    with tarfile.open(embedded.tar_files[0]) as archive:
        key = min(name for name in archive.getnames() if name.endswith(".jpg"))[: -len(".jpg")]
        data = archive.extractfile(f"{key}.jpg").read()
    path = tmp_path / "query.jpg"
    path.write_bytes(data)
    for query in (data, str(path), path):
        hits = embedded.search(image=query, k=3)  # the model is the one recorded with the embeddings
        assert hits["key"].iloc[0] == key and hits["score"].iloc[0] > 0.9999, (type(query), hits)
    pil_hits = embedded.search(image=Image.open(path), k=1)
    assert pil_hits["key"].iloc[0] == key and pil_hits["score"].iloc[0] > 0.999


def test_text_query_matches_transformers_text_features(
    embedded: ImageTextPairDataset, model_with_tokenizer: Path
) -> None:
    from transformers import AutoTokenizer, CLIPModel

    text = "a photo of an astronaut"
    model = CLIPModel.from_pretrained(model_with_tokenizer).eval()
    tokens = AutoTokenizer.from_pretrained(model_with_tokenizer)([text], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens)
    reference = getattr(features, "pooler_output", features)[0].numpy()
    expected = brute_force(embedded, reference)[:5]

    hits = embedded.search(text=text, k=5, model_dir=str(model_with_tokenizer))
    assert hits["key"].tolist() == [key for key, _ in expected]
    np.testing.assert_allclose(hits["score"], [score for _, score in expected], atol=1e-4)


def test_errors_name_the_problem(embedded: ImageTextPairDataset, tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of text= or image="):
        embedded.search(text="a cat", image=np.ones(32))
    with pytest.raises(ValueError, match=r"query embedding has shape \(8,\); 'image_embedding' holds vectors of 32"):
        embedded.search(image=np.ones(8))
    with pytest.raises(ColumnError, match=r"search reads columns \['clip'\]"):
        embedded.search(image=np.ones(32), embedding_column="clip")
    with pytest.raises(OSError, match="cannot load the tokenizer"):
        embedded.search(text="a cat", model_dir=str(tiny_model))  # saved without tokenizer files


def test_an_image_path_that_is_no_file_is_named(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(UsageError, match=f"image {str(missing)!r}: no such file"):
        embedded.search(image=str(missing))
    with pytest.raises(UsageError, match=f"image {str(tmp_path)!r} is a folder, not an image file"):
        embedded.search(image=tmp_path)


def test_nprobe_is_refused_without_an_index(embedded: ImageTextPairDataset) -> None:
    for nprobe in (0, 4):
        with pytest.raises(UsageError, match=rf"nprobe={nprobe} applies to an index search only: give index="):
            embedded.search(image=np.ones(32, dtype=np.float32), nprobe=nprobe)

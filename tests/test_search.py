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
from dask_clip.errors import ModelLoadError


@pytest.fixture(scope="module")
def embedded(client, pristine_embedded: Path) -> ImageTextPairDataset:
    """Shards whose parquets hold saved embeddings (15 images, 3 failed downloads), read back."""
    return ImageTextPairDataset.from_webdataset(str(pristine_embedded))


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
    with pytest.raises(UsageError, match="another model than the one that embedded 'image_embedding'"):
        embedded.search(image=np.zeros((4, 4, 3), np.uint8).tobytes(), model_dir=str(tiny_model))  # another folder


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


# --- the query model is the model of the column ---------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SigLIP with a tokenizer: 32-d embeddings, as wide as the tiny CLIP's."""
    return testing.save_random_siglip_model(tmp_path_factory.mktemp("siglip") / "model")


@pytest.fixture(scope="module")
def siglip_embedded(client, pristine_shards: Path, siglip_model: Path, tmp_path_factory) -> ImageTextPairDataset:
    folder = Path(shutil.copytree(pristine_shards, tmp_path_factory.mktemp("search-siglip") / "shards"))
    ClipImageEmbedder(str(siglip_model), autocast=False)(
        ImageTextPairDataset.from_webdataset(str(folder))
    ).save_metadata()
    return ImageTextPairDataset.from_webdataset(str(folder))


def query_image(dataset: ImageTextPairDataset) -> bytes:
    with tarfile.open(dataset.tar_files[0]) as archive:
        name = min(name for name in archive.getnames() if name.endswith(".jpg"))
        return archive.extractfile(name).read()


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("column_family", ["SigLIP", "CLIP"])
def test_a_query_embedded_by_another_family_of_the_same_width_is_refused(
    embedded: ImageTextPairDataset,
    siglip_embedded: ImageTextPairDataset,
    model_with_tokenizer: Path,
    siglip_model: Path,
    kind: str,
    column_family: str,
) -> None:
    dataset, recorded, other = (siglip_embedded, siglip_model, model_with_tokenizer)
    if column_family == "CLIP":
        dataset, recorded, other = (embedded, model_with_tokenizer, siglip_model)
    query = {"text": "a photo of a cat"} if kind == "text" else {"image": query_image(dataset)}
    with pytest.raises(UsageError, match="another model than the one that embedded 'image_embedding'") as raised:
        dataset.search(model_dir=str(other), **query)
    message = str(raised.value)
    assert f"model_dir={str(recorded)!r}, family SigLIP" in message or column_family == "CLIP", message
    assert f"model_dir={str(other)!r}, family SigLIP" in message or column_family == "SigLIP", message
    assert f"model_dir={str(recorded)!r}, family {column_family}, 32-d" in message, message
    assert str(other) in message and "recorded" in message and "query" in message


def test_the_recorded_model_and_a_raw_vector_are_answered(siglip_embedded: ImageTextPairDataset, siglip_model) -> None:
    image = query_image(siglip_embedded)
    by_default = siglip_embedded.search(image=image, k=3)  # the model recorded with the column
    explicit = siglip_embedded.search(image=image, k=3, model_dir=str(siglip_model))
    assert by_default.equals(explicit) and by_default["score"].iloc[0] > 0.9999
    assert len(siglip_embedded.search(text="a photo of a cat", k=3)) == 3
    assert len(siglip_embedded.search(image=np.ones(32, dtype=np.float32), k=3)) == 3  # no model involved
    with pytest.raises(UsageError, match=r"query embedding has shape \(16,\); 'image_embedding' holds vectors of 32"):
        siglip_embedded.search(image=np.ones(16, dtype=np.float32))


def test_a_model_of_another_width_is_refused_naming_both(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    narrow = testing.save_random_clip_model(tmp_path / "narrow", shape="tiny", projection_dim=16)
    with pytest.raises(UsageError, match="another model") as raised:
        embedded.search(image=query_image(embedded), model_dir=str(narrow))
    assert "family CLIP, 16-d" in str(raised.value) and "family CLIP, 32-d" in str(raised.value)


def test_other_weights_in_the_recorded_folder_are_refused(
    client, pristine_shards: Path, tiny_model: Path, tmp_path
) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))  # no tokenizer files
    folder = Path(shutil.copytree(pristine_shards, tmp_path / "shards"))
    ClipImageEmbedder(str(model), autocast=False)(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        dataset.search(text="a cat")
    testing.save_tokenizer_for_clip_model(model)  # files added next to the weights: still the same checkpoint
    assert len(dataset.search(text="a cat", k=2)) == 2
    testing.save_random_clip_model(model, shape="tiny", seed=1)  # other weights under the same name
    with pytest.raises(UsageError, match="another model") as raised:
        dataset.search(image=query_image(dataset))
    assert "weights" in str(raised.value)


def test_the_cli_exits_2_for_a_query_in_another_space(
    cli, siglip_embedded: ImageTextPairDataset, model_with_tokenizer: Path
) -> None:
    result = cli("search", siglip_embedded.path, "--text", "a cat", "--model-dir", str(model_with_tokenizer))
    assert result.returncode == 2, result.stderr
    assert "UsageError" in result.stderr and "family SigLIP" in result.stderr and "family CLIP" in result.stderr

"""Every checkpoint shape users bring, against transformers' own answer on the same weights: LAION-shaped
CLIP configs written by transformers 4, sharded and half-precision weights, SigLIP (image and text), and
the refusal of what is not supported."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dask_clip import (
    ClipImageEmbedder,
    ClipTextEmbedder,
    ImageTextPairDataset,
    ModelLoadError,
    embeddings_to_numpy,
    testing,
)


def images_of(shards: Path) -> dict[str, Image.Image]:
    images = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    images[member.name[: -len(".jpg")]] = Image.open(io.BytesIO(archive.extractfile(member).read()))
    return images


def reference(model_class: Any, processor: Any, model_dir: Path, shards: Path) -> dict[str, np.ndarray]:
    """transformers' get_image_features of ``model_class`` (the full model) on ``processor``'s pixels, in fp32."""
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for key, image in images_of(shards).items():
        with torch.no_grad():
            features = model.get_image_features(
                pixel_values=processor(images=image, return_tensors="pt")["pixel_values"]
            )
        vector = getattr(features, "pooler_output", features)[0].numpy()
        out[key] = vector / np.linalg.norm(vector)
    return out


def embedded(model_dir: Path, shards: Path, **options: Any) -> tuple[int, dict[str, np.ndarray]]:
    embedder = ClipImageEmbedder(str(model_dir), autocast=False, **options)
    frame = embedder(ImageTextPairDataset.from_webdataset(str(shards))).metadata.compute(scheduler="threads")
    vectors = embeddings_to_numpy(frame["image_embedding"])
    assert vectors.shape[1] == embedder.embedding_dim, "the width known on the client differs from the workers'"
    return embedder.embedding_dim, {k: v for k, v in zip(frame["key"], vectors, strict=True) if not np.isnan(v).all()}


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], minimum: float) -> None:
    assert got.keys() == expected.keys()
    cosines = {key: float(got[key] @ vector) for key, vector in expected.items()}
    assert min(cosines.values()) >= minimum, cosines


def clip_processor(model_dir: Path) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


@pytest.fixture(scope="module")
def laion_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIPModel whose projection (48) is only at the top level of a transformers 4 config (LAION's shape)."""
    folder = testing.save_random_clip_model(tmp_path_factory.mktemp("laion"), shape="tiny", projection_dim=48)
    return testing.write_transformers4_clip_config(folder)


def test_a_laion_shaped_transformers4_config_embeds_with_its_top_level_width(shards: Path, laion_shaped: Path) -> None:
    from transformers import CLIPModel

    config = json.loads((laion_shaped / "config.json").read_text())
    assert (config["projection_dim"], config["vision_config"]["projection_dim"]) == (48, 512)
    assert json.loads((laion_shaped / "preprocessor_config.json").read_text())["size"] == 224
    width, got = embedded(laion_shaped, shards)
    assert width == 48
    assert_close(got, reference(CLIPModel, clip_processor(laion_shaped), laion_shaped, shards), 0.9999)


def test_sharded_safetensors_with_an_index(shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel

    sharded = tmp_path / "sharded"
    CLIPModel.from_pretrained(tiny_model).save_pretrained(sharded, max_shard_size="200KB")
    shutil.copy(tiny_model / "preprocessor_config.json", sharded)
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    _, got = embedded(sharded, shards)
    assert_close(got, reference(CLIPModel, clip_processor(tiny_model), tiny_model, shards), 0.9999)


@pytest.mark.parametrize(("dtype", "minimum"), [(torch.float16, 0.999), (torch.bfloat16, 0.99)])
def test_half_precision_weights_are_computed_in_float32(
    shards: Path, tiny_model: Path, tmp_path: Path, dtype: torch.dtype, minimum: float
) -> None:
    from transformers import CLIPModel

    half = tmp_path / str(dtype).split(".")[-1]
    CLIPModel.from_pretrained(tiny_model).to(dtype).save_pretrained(half)
    shutil.copy(tiny_model / "preprocessor_config.json", half)
    _, got = embedded(half, shards)
    assert_close(got, reference(CLIPModel, clip_processor(tiny_model), half, shards), 0.9999)  # the same weights
    assert_close(got, reference(CLIPModel, clip_processor(tiny_model), tiny_model, shards), minimum)  # vs fp32 ones


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_random_siglip_model(tmp_path_factory.mktemp("siglip"))


def test_siglip_embeds_with_its_own_preprocessing(shards: Path, siglip: Path) -> None:
    from transformers import SiglipImageProcessor, SiglipModel

    processor = SiglipImageProcessor.from_pretrained(siglip)
    assert processor.size == {"height": 224, "width": 224} and not getattr(processor, "do_center_crop", False)
    width, exact = embedded(siglip, shards, decode_mode="exact")
    expected = reference(SiglipModel, processor, siglip, shards)
    assert width == 32
    assert_close(exact, expected, 0.9999)
    _, fast = embedded(siglip, shards, decode_mode="fast")
    cosines = [float(fast[key] @ vector) for key, vector in expected.items()]
    # reduced-size JPEG decoding moves a random-weight SigLIP more than CLIP (the README quotes both)
    assert np.mean(cosines) >= 0.99 and min(cosines) >= 0.9, cosines


def test_siglip_text_embeddings_match_get_text_features(siglip: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, SiglipModel

    captions = ["a photo of a cat", "a photo of the dog", None, "coffee"]
    rows = [{"key": f"{i:09d}", "caption": caption, "status": "success"} for i, caption in enumerate(captions)]
    testing.write_shard(tmp_path / "shards", 0, rows, {})
    frame = ClipTextEmbedder(str(siglip))(ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")))
    vectors = embeddings_to_numpy(frame.metadata.compute(scheduler="threads")["text_embedding"])
    model = SiglipModel.from_pretrained(siglip).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip)
    for vector, caption in zip(vectors, captions, strict=True):
        if caption is None:
            assert np.isnan(vector).all()
            continue
        tokens = tokenizer([caption], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            features = model.get_text_features(input_ids=tokens["input_ids"])
        expected = getattr(features, "pooler_output", features)[0].numpy()
        assert float(vector @ expected / np.linalg.norm(expected)) >= 0.9999, caption


def test_unsupported_checkpoints_are_refused_with_the_reason(siglip: Path, tmp_path: Path) -> None:
    naflex = Path(shutil.copytree(siglip, tmp_path / "naflex"))
    config = json.loads((naflex / "config.json").read_text())
    (naflex / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(ModelLoadError, match=r"SigLIP 2 NaFlex checkpoint .* does not support"):
        ClipImageEmbedder(str(naflex))
    other = Path(shutil.copytree(siglip, tmp_path / "other"))
    (other / "config.json").write_text(json.dumps({**config, "model_type": "blip"}))
    with pytest.raises(ModelLoadError, match=r"model_type 'blip'; dask_clip embeds with \['clip'"):
        ClipImageEmbedder(str(other))


def test_text_search_over_siglip_embeddings_uses_siglip_text_features(shards: Path, siglip: Path) -> None:
    from transformers import AutoTokenizer, SiglipModel

    ClipImageEmbedder(str(siglip), autocast=False)(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    hits = dataset.search(text="a photo of a cat", k=3)
    model = SiglipModel.from_pretrained(siglip).eval()
    tokens = AutoTokenizer.from_pretrained(siglip)(
        ["a photo of a cat"], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        features = model.get_text_features(input_ids=tokens["input_ids"])
    query = getattr(features, "pooler_output", features)[0].numpy()
    query = query / np.linalg.norm(query)
    frame = dataset.metadata.compute(scheduler="threads")
    vectors = embeddings_to_numpy(frame["image_embedding"])
    scores = np.where(np.isnan(vectors).any(axis=1), -np.inf, np.nan_to_num(vectors) @ query)
    assert hits["key"].tolist() == frame["key"].iloc[np.argsort(-scores)[:3]].tolist()
    np.testing.assert_allclose(hits["score"], np.sort(scores)[::-1][:3], atol=1e-5)

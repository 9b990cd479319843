"""TimmImageEmbedder: timm's own preprocessing config and forward, on a real cluster."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dask_clip import ImageTextPairDataset, embeddings_to_numpy

timm = pytest.importorskip("timm")
from dask_clip.embedders.timm import TimmImageEmbedder  # noqa: E402

MODEL = "vit_tiny_patch16_224"  # crop_pct 0.9, mean/std 0.5: a config unlike CLIP's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=24)
    path = tmp_path_factory.mktemp("timm") / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def timm_reference(checkpoint: Path, shards: Path) -> dict[str, np.ndarray]:
    """timm's own transforms and forward on each image of the shards, normalised."""
    model = timm.create_model(MODEL, pretrained=False, num_classes=24, checkpoint_path=str(checkpoint)).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                    with torch.no_grad():
                        vector = model(transform(image).unsqueeze(0))[0].numpy()
                    out[member.name[:-4]] = vector / np.linalg.norm(vector)
    return out


def test_matches_timm_transforms_and_forward(client, shards: Path, checkpoint: Path) -> None:
    embedder = TimmImageEmbedder(
        MODEL,
        checkpoint_path=str(checkpoint),
        batch_size=4,
        num_threads_per_worker=1,
        autocast=False,
        model_kwargs={"num_classes": 24},
    )
    assert embedder.embedding_dim == 24
    frame = embedder(ImageTextPairDataset.from_webdataset(str(shards))).metadata.compute()
    vectors = dict(zip(frame["key"], embeddings_to_numpy(frame["image_embedding"]), strict=True))
    reference = timm_reference(checkpoint, shards)
    assert len(reference) == 15
    for key, expected in reference.items():
        assert float(vectors[key] @ expected) >= 0.9999, key
    assert frame["embedding_error"].notna().sum() == 3


def test_unknown_model_and_bad_threads_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'no_such_model'"):
        TimmImageEmbedder("no_such_model", checkpoint_path="w.safetensors")
    with pytest.raises(ValueError, match="num_threads_per_worker"):
        TimmImageEmbedder(MODEL, num_threads_per_worker=0)
    with pytest.raises(ValueError, match="random weights would differ on every worker"):
        TimmImageEmbedder(MODEL)


def test_preprocess_config_follows_the_model() -> None:
    from dask_clip.models.timm import timm_preprocess_config

    config = timm_preprocess_config(
        {
            "input_size": (3, 224, 224),
            "interpolation": "bicubic",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "crop_pct": 0.9,
        },
        max_image_pixels=64_000_000,
    )
    assert (config.shortest_edge, config.crop_height, config.mean) == (248, 224, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="crop_mode 'squash'"):
        timm_preprocess_config(
            {"input_size": (3, 224, 224), "mean": (0,) * 3, "std": (1,) * 3, "crop_mode": "squash"}, max_image_pixels=1
        )


def test_device_decode_mode_stays_close_to_timms_transforms(client, shards: Path, checkpoint: Path) -> None:
    embedder = TimmImageEmbedder(
        MODEL,
        checkpoint_path=str(checkpoint),
        batch_size=4,
        num_threads_per_worker=1,
        autocast=False,
        model_kwargs={"num_classes": 24},
        decode_mode="device",
    )
    assert embedder.config()["decode_mode"] == "device"
    assert embedder.load_model().preprocess.device_decode
    frame = embedder(ImageTextPairDataset.from_webdataset(str(shards))).metadata.compute()
    vectors = dict(zip(frame["key"], embeddings_to_numpy(frame["image_embedding"]), strict=True))
    cosines = [float(vectors[key] @ expected) for key, expected in timm_reference(checkpoint, shards).items()]
    assert len(cosines) == 15 and min(cosines) >= 0.999, cosines
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        TimmImageEmbedder(MODEL, checkpoint_path=str(checkpoint), decode_mode="gpu")

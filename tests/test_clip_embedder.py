"""ClipImageEmbedder on a real 2-worker LocalCluster: values, row alignment, errors, model cache."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, cache_info, clear_cache, embeddings_to_numpy, testing
from dask_clip.errors import DeviceUnavailableError, ModelLoadError, ShardReadError
from dask_clip.models.device import resolve_device


def reference_embeddings(model_dir: Path, shard_folder: Path) -> dict[str, np.ndarray]:
    """transformers' own answer: CLIPImageProcessor + CLIPModel.get_image_features, fp32, normalised."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    out = {}
    for tar in sorted(shard_folder.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(archive.extractfile(member).read()))
                    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
                    with torch.no_grad():
                        features = model.get_image_features(pixel_values=pixels)
                    vector = getattr(features, "pooler_output", features)[0].numpy()
                    out[member.name[: -len(".jpg")]] = vector / np.linalg.norm(vector)
    return out


def test_embeddings_match_transformers_reference_per_key(client, shards: Path, tiny_model: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    embedded = ClipImageEmbedder(str(tiny_model), model_inference_batch_size=4, autocast=False)(dataset)
    frame = embedded.metadata.compute()
    assert str(embedded.metadata.dtypes["image_embedding"]) == "fixed_size_list<item: float>[32][pyarrow]"
    vectors = embeddings_to_numpy(frame["image_embedding"])
    reference = reference_embeddings(tiny_model, shards)
    assert len(reference) == 15
    by_key = dict(zip(frame["key"], vectors, strict=True))
    for key, expected in reference.items():
        cosine = float(by_key[key] @ expected / np.linalg.norm(by_key[key]))
        assert cosine >= 0.9999, (key, cosine)
    assert np.allclose(np.linalg.norm(vectors[frame["embedding_error"].isna().to_numpy()], axis=1), 1, atol=1e-5)


def test_rows_are_never_dropped_and_failed_downloads_get_a_reason(client, shards: Path, tiny_model: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    original = dataset.metadata.compute()
    frame = ClipImageEmbedder(str(tiny_model), autocast=False)(dataset).metadata.compute()
    assert frame["key"].tolist() == original["key"].tolist()
    pd.testing.assert_frame_equal(frame[original.columns], original)
    failed = frame["status"] == "failed_to_download"
    assert failed.sum() == 3
    assert frame.loc[failed, "image_embedding"].isna().all()
    assert frame.loc[failed, "embedding_error"].str.contains("failed_to_download").all()
    assert frame.loc[~failed, "image_embedding"].notna().all()
    assert frame.loc[~failed, "embedding_error"].isna().all()


def test_unnormalised_embeddings_and_vision_only_checkpoints(
    client, shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    vision_only = tmp_path / "vision"
    CLIPVisionModelWithProjection.from_pretrained(tiny_model).save_pretrained(vision_only)
    CLIPImageProcessor.from_pretrained(tiny_model).save_pretrained(vision_only)
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    full = ClipImageEmbedder(str(tiny_model), autocast=False, normalize_embeddings=False)(dataset).metadata.compute()
    tower = ClipImageEmbedder(str(vision_only), autocast=False, normalize_embeddings=False)(dataset).metadata.compute()
    full_vectors = embeddings_to_numpy(full["image_embedding"])
    tower_vectors = embeddings_to_numpy(tower["image_embedding"])
    ok = full["embedding_error"].isna().to_numpy()
    assert not np.allclose(np.linalg.norm(full_vectors[ok], axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(full_vectors[ok], tower_vectors[ok], rtol=1e-4, atol=1e-5)


def test_one_model_load_per_worker_over_many_partitions_and_calls(client, tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "many"
    testing.make_img2dataset_shards(folder, shard_numbers=range(8), samples_per_shard=2, failed_per_shard=0)
    clear_cache(client)
    embedder = ClipImageEmbedder(str(tiny_model), autocast=False, embedding_column="e1")
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    embedder(dataset).metadata.compute()
    embedder(dataset).metadata.compute()
    info = cache_info(client)
    assert len(info) == 2
    assert all(workers == {embedder.model.cache_key: 1} for workers in info.values()), info

    other = ClipImageEmbedder(str(tiny_model), autocast=True, embedding_column="e2")
    assert other.model.cache_key != embedder.model.cache_key
    other(dataset).metadata.compute()
    loads = [counts for counts in cache_info(client).values() if other.model.cache_key in counts]
    assert loads and all(counts[embedder.model.cache_key] == 1 for counts in loads)
    dropped = clear_cache(client)
    assert all(embedder.model.cache_key in keys for keys in dropped.values())
    assert all(keys == {} for keys in cache_info(client).values())


def test_cache_works_without_a_cluster(shards: Path, tiny_model: Path) -> None:
    import dask

    clear_cache(client=None) if _no_client() else None
    embedder = ClipImageEmbedder(str(tiny_model), autocast=False, embedding_column="local")
    with dask.config.set(scheduler="synchronous"):
        frame = embedder(ImageTextPairDataset.from_webdataset(str(shards))).metadata.compute()
    assert frame["local"].notna().sum() == 15


def _no_client() -> bool:
    from distributed import get_client

    try:
        get_client()
    except ValueError:
        return True
    return False


def test_tar_keys_that_the_parquet_lacks_are_reported(client, shards: Path, tiny_model: Path) -> None:
    with tarfile.open(shards / "00001.tar", "a") as archive:
        payload = testing.encode_jpeg(np.zeros((32, 32, 3), dtype=np.uint8))
        info = tarfile.TarInfo("999999999.jpg")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(
        ShardReadError, match=r"00001\.tar: 1 samples have keys that the shard's parquet lacks .*999999999"
    ):
        ClipImageEmbedder(str(tiny_model))(dataset).metadata.compute()


def test_missing_weights_say_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"(?s)'/nonexistent/clip' does not exist.*save_pretrained"):
        ClipImageEmbedder("/nonexistent/clip")
    with pytest.raises(ModelLoadError, match=r"(?s)'openai/clip-vit-large-patch14'.*huggingface-cli download"):
        ClipImageEmbedder("openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="model_dir is empty"):
        ClipImageEmbedder("")


def test_pickled_checkpoints_are_refused(shards: Path, tmp_path: Path) -> None:
    """A folder with only ``pytorch_model.bin`` (as transformers 4 wrote by default) is refused when the embedder
    is built, on the client; a worker refuses it too (a folder that changed after the check)."""
    from transformers import CLIPModel

    model_dir = testing.save_random_clip_model(tmp_path / "pickle", shape="tiny")
    embedder = ClipImageEmbedder(str(model_dir))
    torch.save(CLIPModel.from_pretrained(model_dir).state_dict(), model_dir / "pytorch_model.bin")
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match=r"has no safetensors weights.*\['pytorch_model.bin'\].*only safetensors"):
        ClipImageEmbedder(str(model_dir))
    with pytest.raises(ModelLoadError, match="only safetensors"):
        embedder.load_model()


def test_a_cuda_device_the_worker_lacks_is_a_clear_error(client, shards: Path, tiny_model: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last visible GPU: cuda:0 on a machine without one
    with pytest.raises(DeviceUnavailableError, match=rf"device '{missing}' was asked for, but this process on .* sees"):
        resolve_device(missing)
    assert resolve_device("cpu") == "cpu"
    embedded = ClipImageEmbedder(str(tiny_model), device=missing)(ImageTextPairDataset.from_webdataset(str(shards)))
    with pytest.raises(DeviceUnavailableError, match=r"device 'cuda:\d+' was asked for, but this process on .* sees"):
        embedded.metadata.compute()

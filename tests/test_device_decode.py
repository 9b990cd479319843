"""decode_mode="device": JPEGs decoded in batches on the model's device (TorchCodec; nvJPEG on a GPU).

On the CPU, TorchCodec's libjpeg-turbo decode is pixel-identical to Pillow's, so every device-decoded
crop must equal the Pillow path with torch's resize exactly: the tests below hold the batched device
path to that, and to the same rows, errors and embeddings as decoding everything on the host.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, testing
from dask_clip.errors import ImageDecodeError
from dask_clip.images import device_decode
from dask_clip.images.device_decode import (
    EncodedJpeg,
    chunks_by_pixels,
    decode_on_device,
    import_decode_jpeg,
    prepare_image,
)
from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess

from .test_clip_embedder import reference_embeddings
from .test_fast_decode import jpeg

DEVICE = PreprocessConfig().with_decode_mode("device")
HOST = PreprocessConfig(torch_resize=True)  # the host path the device path must reproduce


def reencoded(data: bytes, mode: str, image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()


def as_hwc(pixels: Any) -> np.ndarray:
    return pixels.permute(1, 2, 0).cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels


@pytest.mark.parametrize(
    "data, shortest_edge",
    [
        (jpeg(300, 500), 224),  # downscaled, landscape
        (jpeg(900, 600), 224),  # downscaled, portrait
        (jpeg(150, 200), 224),  # upscaled
        (reencoded(jpeg(300, 500), "L"), 224),  # grayscale becomes RGB
        (jpeg(100, 150), 100),  # resized smaller than the 224 crop: zero-padded
    ],
    ids=["landscape", "portrait", "upscaled", "grayscale", "padded"],
)
def test_device_decode_on_the_cpu_equals_the_host_path_exactly(data: bytes, shortest_edge: int) -> None:
    config = PreprocessConfig(shortest_edge=shortest_edge).with_decode_mode("device")
    encoded = prepare_image(data, config)
    assert isinstance(encoded, EncodedJpeg), "the JPEG was not left for the device"
    (pixels,) = decode_on_device([encoded], config, "cpu")
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    host = decode_and_preprocess(data, PreprocessConfig(shortest_edge=shortest_edge, torch_resize=True))
    np.testing.assert_array_equal(as_hwc(pixels), host)


@pytest.mark.parametrize(
    "data",
    [
        reencoded(jpeg(300, 500), "RGB", "PNG"),
        reencoded(jpeg(300, 500), "CMYK"),
        jpeg(300, 500, orientation=6),  # decoders differ on applying EXIF orientation
        jpeg(300, 500) + b"\0" * 16,  # not ending with its end-of-image marker: Pillow's truncation check decides
    ],
    ids=["png", "cmyk-jpeg", "exif-rotated-jpeg", "jpeg-with-trailing-bytes"],
)
def test_other_images_are_decoded_by_pillow_on_the_decode_threads(data: bytes) -> None:
    prepared = prepare_image(data, DEVICE)
    assert isinstance(prepared, np.ndarray)
    np.testing.assert_array_equal(prepared, decode_and_preprocess(data, HOST))


def test_truncated_jpegs_get_pillows_reason_and_filters_torch_lacks_stay_on_the_host() -> None:
    with pytest.raises(ImageDecodeError, match="truncated"):
        prepare_image(jpeg(300, 500)[:3000], DEVICE)
    lanczos = PreprocessConfig(resample=Image.Resampling.LANCZOS).with_decode_mode("device")
    assert isinstance(prepare_image(jpeg(300, 500), lanczos), np.ndarray)
    assert isinstance(prepare_image(jpeg(300, 500), HOST), np.ndarray), "device decode without device_decode"


def test_a_jpeg_the_device_refuses_is_decoded_by_pillow_and_the_others_keep_their_order(monkeypatch) -> None:
    real_decode = import_decode_jpeg()
    refused, transposed = jpeg(300, 500, seed=1), jpeg(300, 500, seed=2)
    calls: list[int] = []

    def fussy_decoder(source: Any, **options: Any) -> Any:
        calls.append(len(source) if isinstance(source, list) else 1)
        sources = source if isinstance(source, list) else [source]
        if refused in sources:
            raise RuntimeError("decode_jpegs, DecodeJpeg.cu:12, nvjpeg refuses this one")
        decoded = [real_decode(item, **options) for item in sources]
        pairs = zip(sources, decoded, strict=True)
        decoded = [image.transpose(1, 2) if item == transposed else image for item, image in pairs]
        return decoded if isinstance(source, list) else decoded[0]

    monkeypatch.setattr(device_decode, "import_decode_jpeg", lambda: fussy_decoder)
    datas = [jpeg(300, 500, seed=3), refused, transposed, jpeg(400, 300, seed=4)]
    results = decode_on_device([prepare_image(data, DEVICE) for data in datas], DEVICE, "cpu")
    assert calls == [4, 1, 1, 1, 1], "one batched call, then one call per JPEG after it failed"
    assert [type(result).__name__ for result in results] == ["Tensor", "ndarray", "ndarray", "Tensor"]
    for data, result in zip(datas, results, strict=True):
        np.testing.assert_array_equal(as_hwc(result), decode_and_preprocess(data, HOST))


def test_chunks_hold_at_most_the_pixel_budget_and_every_jpeg_once() -> None:
    jpegs = [EncodedJpeg(b"", width, 10) for width in (5, 5, 20, 3, 3, 3)]  # 50, 50, 200, 30, 30, 30 pixels
    chunks = list(chunks_by_pixels(jpegs, 100))
    assert [[jpeg.width for jpeg in chunk] for chunk in chunks] == [[5, 5], [20], [3, 3, 3]]
    assert list(chunks_by_pixels([], 100)) == []


def test_without_torchcodec_the_error_names_what_to_install(monkeypatch, tiny_model: Path) -> None:
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchcodec" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "dask_clip\[gpu\]"'):
        ClipImageEmbedder(str(tiny_model), decode_mode="device")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with pytest.raises(ImportError, match=r'pip install "dask_clip\[gpu\]"'):
        import_decode_jpeg()


def mixed_shard(folder: Path) -> dict[str, bytes]:
    """One shard whose images take every route: device JPEGs, host images between them, and a bad one."""
    photos = testing.sample_photos(["astronaut", "chelsea", "coffee", "rocket", "camera"])
    images = {
        "00000000": testing.encode_jpeg(photos["astronaut"]),
        "00000001": reencoded(testing.encode_jpeg(photos["chelsea"]), "RGB", "PNG"),
        "00000002": testing.encode_jpeg(photos["coffee"]),
        "00000003": reencoded(testing.encode_jpeg(photos["rocket"]), "CMYK"),
        "00000004": testing.encode_jpeg(photos["camera"]),  # grayscale photo
        "00000005": testing.encode_jpeg(photos["rocket"])[:2000],  # truncated
        "00000006": jpeg(300, 500, orientation=8),
        "00000007": testing.encode_jpeg(photos["chelsea"]),
    }
    rows = [{"key": key, "caption": key, "status": "success"} for key in images]
    testing.write_shard(folder, 0, rows, {key: {"jpg": data} for key, data in images.items()})
    return images


def test_device_mode_embeds_every_row_as_the_host_path_would(client, tmp_path: Path, tiny_model: Path) -> None:
    images = mixed_shard(tmp_path)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    embedder = ClipImageEmbedder(str(tiny_model), model_inference_batch_size=3, autocast=False, decode_mode="device")
    frame = embedder(dataset).metadata.compute().set_index("key")
    assert embedder.config()["decode_mode"] == "device"

    model = embedder.load_model()
    assert model.preprocess.device_decode and not model.preprocess.draft
    expected_errors = {"00000005"}
    assert set(frame.index[frame["embedding_error"].notna()]) == expected_errors
    assert "truncated" in frame.loc["00000005", "embedding_error"]
    keys = [key for key in images if key not in expected_errors]
    expected = model.embed([decode_and_preprocess(images[key], HOST) for key in keys])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings_to_numpy(frame.loc[keys, "image_embedding"]), expected, atol=1e-5)


def test_device_mode_agrees_with_transformers(client, shards: Path, tiny_model: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    frame = ClipImageEmbedder(str(tiny_model), autocast=False, decode_mode="device")(dataset).metadata.compute()
    by_key = dict(zip(frame["key"], embeddings_to_numpy(frame["image_embedding"]), strict=True))
    reference = reference_embeddings(tiny_model, shards)
    cosines = np.array([float(by_key[key] @ vector) for key, vector in reference.items()])
    assert len(cosines) == 15 and cosines.min() >= 0.999, cosines


@pytest.mark.gpu
def test_nvjpeg_decode_is_close_to_the_cpu_decode() -> None:
    datas = [jpeg(300, 500, seed=seed) for seed in range(4)] + [reencoded(jpeg(600, 400), "L")]
    encoded = [prepare_image(data, DEVICE) for data in datas]
    on_gpu = decode_on_device(encoded, DEVICE, "cuda")
    on_cpu = decode_on_device(encoded, DEVICE, "cpu")
    for gpu_pixels, cpu_pixels in zip(on_gpu, on_cpu, strict=True):
        assert gpu_pixels.device.type == "cuda"
        difference = np.abs(as_hwc(gpu_pixels).astype(int) - as_hwc(cpu_pixels))
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few pixels at sharp colour edges differ
        # by more (seen on an H200: mean 1.05, max 24 of 255), the bulk by a level or two
        spread = (difference.mean(), np.percentile(difference, 99), difference.max())
        assert spread[0] < 1.5 and spread[1] <= 10 and spread[2] <= 40, spread


@pytest.mark.gpu
def test_nvjpeg_embeddings_match_the_cpu_device_path_row_by_row(client, tmp_path: Path, tiny_model: Path) -> None:
    mixed_shard(tmp_path)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    frames = {
        device: ClipImageEmbedder(
            str(tiny_model), model_inference_batch_size=3, autocast=False, decode_mode="device", device=device
        )(dataset)
        .metadata.compute()
        .set_index("key")
        for device in ("cpu", "cuda")
    }
    errors = {device: frame["embedding_error"].notna() for device, frame in frames.items()}
    assert errors["cpu"].equals(errors["cuda"]) and errors["cpu"].sum() == 1
    cpu, cuda = (
        embeddings_to_numpy(frames[device].loc[~errors["cpu"], "image_embedding"]) for device in ("cpu", "cuda")
    )
    assert (np.einsum("nd,nd->n", cpu, cuda) >= 0.999).all()

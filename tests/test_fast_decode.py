"""decode_mode: the fast JPEG decode (Image.draft) against the exact one, and the exact one against transformers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, testing
from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess

from .test_clip_embedder import reference_embeddings

EXACT = PreprocessConfig()
DRAFT = PreprocessConfig(draft=True)
TORCH_RESIZE = PreprocessConfig(torch_resize=True)
FAST = PreprocessConfig(draft=True, torch_resize=True)  # what decode_mode="fast" uses


def jpeg(height: int, width: int, orientation: int | None = None, seed: int = 0) -> bytes:
    """A textured photo crop as JPEG, optionally with an EXIF orientation tag."""
    photo = testing.sample_photos(["astronaut"])["astronaut"]
    rng = np.random.default_rng(seed)
    pixels = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def straightforward(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """CLIP's preprocessing written plainly: full decode, EXIF transpose, bicubic resize, centre crop."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    width, height = image.size
    size = (
        (config.shortest_edge, int(config.shortest_edge * height / width))
        if width <= height
        else (int(config.shortest_edge * width / height), config.shortest_edge)
    )
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left, top = (size[0] - config.crop_width) // 2, (size[1] - config.crop_height) // 2
    return np.asarray(image.crop((left, top, left + config.crop_width, top + config.crop_height)))


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
def test_exact_mode_is_bit_identical_to_the_plain_pipeline(orientation: int | None) -> None:
    data = jpeg(600, 900, orientation)
    np.testing.assert_array_equal(decode_and_preprocess(data, EXACT), straightforward(data, EXACT))


@pytest.mark.parametrize("orientation", [None, 6])
def test_fast_mode_decodes_large_jpegs_at_reduced_size_and_stays_close(orientation: int | None) -> None:
    data = jpeg(600, 900, orientation)  # >= 2x the 224 target: decoded at 1/2 scale
    exact = decode_and_preprocess(data, EXACT).astype(np.float64)
    fast = decode_and_preprocess(data, FAST).astype(np.float64)
    assert fast.shape == exact.shape == (224, 224, 3)
    difference = np.abs(fast - exact)
    assert difference.max() > 0, "the fast mode did not take effect"
    assert difference.mean() < 4, difference.mean()
    # the orientation is applied in both modes: the fast crop is far closer to the exact crop than to its mirror
    assert difference.mean() < np.abs(fast - exact[:, ::-1]).mean() / 3


@pytest.mark.parametrize("size", [(300, 400), (447, 800)])
def test_draft_is_a_no_op_for_jpegs_under_twice_the_target(size: tuple[int, int]) -> None:
    data = jpeg(*size)
    np.testing.assert_array_equal(decode_and_preprocess(data, DRAFT), decode_and_preprocess(data, EXACT))


def test_draft_is_a_no_op_for_png() -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg(600, 900))).save(buffer, format="PNG")
    data = buffer.getvalue()
    np.testing.assert_array_equal(decode_and_preprocess(data, DRAFT), decode_and_preprocess(data, EXACT))


@pytest.mark.parametrize("size", [(300, 400), (447, 800), (150, 200), (600, 900)])
def test_torch_resize_is_within_one_level_of_pillow(size: tuple[int, int]) -> None:
    data = jpeg(*size)  # downscaled, upscaled (150 px < 224) and both orientations of the long side
    torch_pixels = decode_and_preprocess(data, TORCH_RESIZE)
    assert torch_pixels.shape == (224, 224, 3) and torch_pixels.dtype == np.uint8
    difference = np.abs(torch_pixels.astype(int) - decode_and_preprocess(data, EXACT))
    assert difference.max() == 1, "torch's resize was not used (or no longer within one level)"
    assert difference.mean() < 0.05


def test_torch_resize_falls_back_to_pillow_for_other_filters() -> None:
    data = jpeg(600, 900)
    lanczos = PreprocessConfig(resample=Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(
        decode_and_preprocess(data, PreprocessConfig(resample=Image.Resampling.LANCZOS, torch_resize=True)),
        decode_and_preprocess(data, lanczos),
    )


def test_decode_mode_defaults_follow_autocast_and_are_part_of_the_cache_key(tiny_model: Path) -> None:
    default = ClipImageEmbedder(str(tiny_model))
    reference = ClipImageEmbedder(str(tiny_model), autocast=False)
    exact = ClipImageEmbedder(str(tiny_model), decode_mode="exact")
    assert default.decode_mode == "fast" and reference.decode_mode == "exact" and exact.decode_mode == "exact"
    assert default.config()["decode_mode"] == "fast" and exact.config()["decode_mode"] == "exact"
    assert default.model.cache_key != exact.model.cache_key
    fast_config, exact_config = default.load_model().preprocess, exact.load_model().preprocess
    assert fast_config.draft and fast_config.torch_resize
    assert not exact_config.draft and not exact_config.torch_resize
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        ClipImageEmbedder(str(tiny_model), decode_mode="quick")


def test_exact_and_fast_modes_against_transformers(client, shards: Path, tiny_model: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    reference = reference_embeddings(tiny_model, shards)
    cosines = {}
    for mode in ("exact", "fast"):
        embedder = ClipImageEmbedder(str(tiny_model), autocast=False, decode_mode=mode, embedding_column="e")
        frame = embedder(dataset).metadata.compute()
        by_key = dict(zip(frame["key"], embeddings_to_numpy(frame["e"]), strict=True))
        cosines[mode] = np.array([float(by_key[key] @ vector) for key, vector in reference.items()])
    assert len(reference) == 15
    assert cosines["exact"].min() >= 0.9999, cosines["exact"]
    assert cosines["fast"].min() >= 0.995, cosines["fast"]
    assert cosines["fast"].min() < 0.99999, "no test image was decoded at reduced size: the fast mode was not exercised"

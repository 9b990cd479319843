"""Bad input never loses or corrupts a row: broken samples get a reason, broken shards a clear error.

Most per-sample cases live in one shard, embedded in one compute next to a clean shard that holds
the equivalent good images, so each bad-but-usable image is compared with its clean twin by key.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, testing
from dask_clip.errors import ImageDecodeError, ShardMetadataError, ShardReadError
from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess

EXIF_ORIENTATION = 0x0112
BOMB_REASON = "image is 30000x30000 = 900000000 pixels, over the limit of 64000000 (max_image_pixels)"


# --- building broken images ------------------------------------------------------------------
def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    """Lossless bytes of ``uint8 (H, W, 3)`` pixels: the clean twin of a converted image."""
    return encode(Image.fromarray(pixels), "PNG")


def decoded_rgb(data: bytes) -> np.ndarray:
    """The first frame of ``data`` as Pillow converts it to RGB: ``uint8 (H, W, 3)``."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def on_white(rgba: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 4)`` composited on a white background -> ``uint8 (H, W, 3)``."""
    alpha = rgba[..., 3:].astype(np.float64) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def header_only_png(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + chunk + encode(Image.new("L", (1, 1)), "PNG")[33:]


def header_only_gif(width: int, height: int) -> bytes:
    """A ~30-byte GIF whose screen and only frame claim ``width x height`` pixels."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + frame + b"\x02\x02\x4c\x01\x00;"


def with_exif_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def alpha_ramp(height: int, width: int) -> np.ndarray:
    """``uint8 (H, W, 1)``: transparent on the left, opaque on the right."""
    return np.broadcast_to(np.linspace(0, 255, width).astype(np.uint8)[None, :, None], (height, width, 1))


def bad_and_clean_samples() -> tuple[dict[str, dict[str, bytes]], dict[str, bytes], dict[str, bytes]]:
    """(members of the bad shard by key, clean twin image by key for every key that must embed,
    near misses: images a wrong conversion would produce, to show the comparisons can fail)."""
    photos = testing.sample_photos(["astronaut", "chelsea", "coffee", "rocket"])
    astronaut, cat, coffee, rocket = photos.values()
    height, width = cat.shape[:2]
    grey = np.asarray(Image.fromarray(cat).convert("L"))
    jpeg = testing.encode_jpeg(astronaut)
    members: dict[str, dict[str, bytes]] = {}
    clean: dict[str, bytes] = {}

    def usable(key: str, extension: str, data: bytes, twin: bytes) -> None:
        members[key] = {extension: data, "txt": key.encode()}
        clean[key] = twin

    usable("good_jpeg", "jpg", jpeg, jpeg)
    usable("good_photo", "jpg", testing.encode_jpeg(rocket), testing.encode_jpeg(rocket))
    usable("png_in_jpg_member", "jpg", png(cat), png(cat))
    gif = encode(Image.fromarray(cat), "GIF", save_all=True, append_images=[Image.fromarray(cat[::-1].copy())])
    usable("animated_gif", "gif", gif, png(decoded_rgb(gif)))
    tiff = encode(Image.fromarray(cat), "TIFF", save_all=True, append_images=[Image.fromarray(cat[::-1].copy())])
    usable("multi_frame_tiff", "tif", tiff, png(cat))
    grey_jpeg = encode(Image.fromarray(grey), "JPEG")
    usable("grayscale", "jpg", grey_jpeg, png(decoded_rgb(grey_jpeg)))
    palette = encode(Image.fromarray(cat).quantize(64), "PNG")
    usable("palette", "png", palette, png(decoded_rgb(palette)))
    transparent = Image.fromarray(cat).quantize(64)
    transparent.info["transparency"] = int(np.asarray(transparent)[height // 2, width // 2])
    transparent_palette = encode(transparent, "PNG")
    usable(
        "palette_transparent",
        "png",
        transparent_palette,
        png(on_white(np.asarray(Image.open(io.BytesIO(transparent_palette)).convert("RGBA")))),
    )
    rgba = np.concatenate([cat, alpha_ramp(height, width)], axis=-1)
    usable("rgba", "png", encode(Image.fromarray(rgba), "PNG"), png(on_white(rgba)))
    grey_alpha = np.concatenate([grey[..., None], alpha_ramp(height, width)], axis=-1)
    usable(
        "grey_alpha",
        "png",
        encode(Image.fromarray(grey_alpha, "LA"), "PNG"),
        png(on_white(np.concatenate([np.repeat(grey[..., None], 3, axis=-1), alpha_ramp(height, width)], -1))),
    )
    cmyk = encode(Image.fromarray(cat).convert("CMYK"), "JPEG", quality=95)
    usable("cmyk_jpeg", "jpg", cmyk, png(decoded_rgb(cmyk)))
    usable(
        "sixteen_bit",
        "png",
        encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        png(np.repeat(grey[..., None], 3, axis=-1)),
    )
    # EXIF 6: the stored pixels must turn 90 degrees clockwise to be upright; 8: counter-clockwise
    for orientation, quarter_turns in ((6, -1), (8, 1)):
        upright = testing.encode_jpeg(np.rot90(coffee, k=quarter_turns).copy(), quality=95)
        usable(f"exif_{orientation}", "jpg", with_exif_orientation(coffee, orientation), upright)
    usable("malformed_json", "jpg", jpeg, jpeg)
    members["malformed_json"]["json"] = b'{"caption": "unterminated'
    usable("non_utf8_txt", "jpg", jpeg, jpeg)
    members["non_utf8_txt"]["txt"] = b"caf\xe9 \xff\xfe"

    near_misses = {
        "tiff_second_frame": png(cat[::-1].copy()),
        "exif_ignored": testing.encode_jpeg(coffee, quality=95),
        "alpha_dropped": png(cat),
        "sixteen_bit_clipped": png(np.full_like(cat, 255)),
    }

    members["truncated_jpeg"] = {"jpg": jpeg[: len(jpeg) // 2]}
    members["zero_bytes"] = {"jpg": b""}
    members["not_an_image"] = {"jpg": b"<html><body>404 Not Found</body></html>"}
    members["png_bomb"] = {"png": header_only_png(30000, 30000)}
    members["gif_bomb"] = {"gif": header_only_gif(30000, 30000)}
    members["thin_strip"] = {"png": encode(Image.new("L", (2, 30000), 128), "PNG")}
    members["text_only"] = {"txt": b"a caption without its image", "json": b"{}"}
    return members, clean, near_misses


def row(key: str, status: str = "success", error: str | None = None) -> dict[str, str | None]:
    return {"key": key, "status": status, "error_message": error}


# --- many bad samples, one compute -------------------------------------------------------------
@dataclass
class Embedded:
    frame: pd.DataFrame  # indexed by key
    bad_keys: list[str]
    usable_keys: list[str]
    clean_shard_rows: int


@pytest.fixture(scope="module")
def embedded(client, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    """Shard 0: bad samples and a failed download; 1: clean twins (``clean/<key>``) and near misses
    (``wrong/<name>``); 2: only failed downloads (an empty tar); 3: no rows. Embedded in one compute."""
    folder = tmp_path_factory.mktemp("bad-input")
    members, clean, near_misses = bad_and_clean_samples()
    bad_rows = [row(key) for key in members] + [row("failed_download", "failed_to_download", "HTTP Error 404")]
    testing.write_shard(folder, 0, bad_rows, members)
    images = {f"clean/{key}": data for key, data in clean.items()}
    images |= {f"wrong/{key}": data for key, data in near_misses.items()}
    clean_members = {key: {"png" if data.startswith(b"\x89PNG") else "jpg": data} for key, data in images.items()}
    testing.write_shard(folder, 1, [row(key) for key in clean_members], clean_members)
    testing.write_shard(folder, 2, [row(f"lost_{i}", "failed_to_download", "timeout") for i in range(3)], {})
    testing.write_shard(folder, 3, [], {})
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    frame = ClipImageEmbedder(str(tiny_model), model_inference_batch_size=4, autocast=False)(dataset).metadata.compute()
    bad_keys = [bad_row["key"] for bad_row in bad_rows]
    return Embedded(frame.set_index("key"), bad_keys, list(clean), len(clean_members))


def vectors_by_key(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return dict(zip(frame.index, embeddings_to_numpy(frame["image_embedding"]), strict=True))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_unusable_images_get_a_null_embedding_and_their_reason(embedded: Embedded) -> None:
    frame = embedded.frame
    reasons = {
        "truncated_jpeg": r"cannot decode image: image file is truncated \(\d+ bytes not processed\)",
        "zero_bytes": re.escape("empty image file (0 bytes)"),
        "not_an_image": re.escape("not a readable image: no Pillow format reads it (data starts with b'<html><b')"),
        "png_bomb": re.escape(BOMB_REASON),
        "gif_bomb": re.escape(BOMB_REASON),
        "thin_strip": re.escape(
            "image is 2x30000: resized to 224x3360000 it would be over the limit of 64000000 pixels (max_image_pixels)"
        ),
        "text_only": re.escape("no image member (members: ['json', 'txt'])"),
        "failed_download": re.escape("no image in the tar (status: failed_to_download, HTTP Error 404)"),
    }
    for key, reason in reasons.items():
        assert re.fullmatch(reason, frame.loc[key, "embedding_error"]), (key, frame.loc[key, "embedding_error"])
        assert pd.isna(frame.loc[key, "image_embedding"]), key
    bad_shard = frame.loc[embedded.bad_keys]
    assert bad_shard["embedding_error"].notna().sum() == len(reasons)
    assert bad_shard["image_embedding"].notna().sum() == len(embedded.usable_keys)


def test_every_usable_image_embeds_like_its_clean_twin(embedded: Embedded) -> None:
    """Odd formats, modes and sidecars: converted to RGB (alpha on white, 16-bit scaled, first frame)."""
    frame = embedded.frame
    vectors = vectors_by_key(frame)
    for key in embedded.usable_keys:
        assert pd.isna(frame.loc[key, "embedding_error"]), (key, frame.loc[key, "embedding_error"])
        threshold = 0.999 if key.startswith("exif") else 0.9999  # the twin re-encodes the rotated pixels
        similarity = cosine(vectors[key], vectors[f"clean/{key}"])
        assert similarity > threshold, (key, similarity)
    # the comparisons can fail: what a wrong conversion gives is measurably further away
    for key, near_miss, threshold in (
        ("multi_frame_tiff", "wrong/tiff_second_frame", 0.9999),
        ("exif_6", "wrong/exif_ignored", 0.999),
        ("exif_8", "wrong/exif_ignored", 0.999),
        ("exif_6", "clean/exif_8", 0.999),
        ("rgba", "wrong/alpha_dropped", 0.9999),
        ("sixteen_bit", "wrong/sixteen_bit_clipped", 0.9999),
    ):
        similarity = cosine(vectors[key], vectors[near_miss])
        assert similarity < threshold, (key, near_miss, similarity)


def test_shards_without_images_are_all_null_rows_with_reasons(embedded: Embedded) -> None:
    """Shard 2 (only failed downloads, a tar without members) and shard 3 (no rows) are legal."""
    lost = embedded.frame.loc[["lost_0", "lost_1", "lost_2"]]
    assert lost["image_embedding"].isna().all()
    assert (lost["embedding_error"] == "no image in the tar (status: failed_to_download, timeout)").all()
    assert len(embedded.frame) == len(embedded.bad_keys) + embedded.clean_shard_rows + 3


# --- the pixel limit ---------------------------------------------------------------------------
def test_max_image_pixels_raised_lets_a_large_image_through_and_lowered_refuses_a_photo(
    client, tiny_model: Path, tmp_path: Path
) -> None:
    large = Image.new("L", (8200, 8000))
    large.paste(255, (0, 0, 4100, 8000))
    photo = testing.encode_jpeg(testing.sample_photos(["astronaut"])["astronaut"])
    members = {"large": {"png": encode(large, "PNG")}, "photo": {"jpg": photo}}
    testing.write_shard(tmp_path, 0, [row(key) for key in members], members)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))

    def reasons(max_image_pixels: int) -> dict[str, str | None]:
        embedder = ClipImageEmbedder(str(tiny_model), autocast=False, max_image_pixels=max_image_pixels)
        frame = embedder(dataset).metadata.compute()
        assert (frame["image_embedding"].isna() == frame["embedding_error"].notna()).all()
        return dict(zip(frame["key"], frame["embedding_error"].replace({pd.NA: None}), strict=True))

    over = "image is 8200x8000 = 65600000 pixels, over the limit of 64000000 (max_image_pixels)"
    assert reasons(64_000_000) == {"large": over, "photo": None}
    assert reasons(70_000_000) == {"large": None, "photo": None}
    assert reasons(100_000) == {
        "large": "image is 8200x8000 = 65600000 pixels, over the limit of 100000 (max_image_pixels)",
        "photo": "image is 512x512 = 262144 pixels, over the limit of 100000 (max_image_pixels)",
    }


def test_the_pixel_limit_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's process-wide limit neither refuses what max_image_pixels allows, nor warns, nor changes."""
    photo = testing.encode_jpeg(testing.sample_photos(["astronaut"])["astronaut"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns above Image.MAX_IMAGE_PIXELS (89M): we read the size first
        between_pillows_limits = r"^image is 10000x10000 = 100000000 pixels, over the limit of 64000000 "
        with pytest.raises(ImageDecodeError, match=between_pillows_limits):
            decode_and_preprocess(header_only_png(10000, 10000), PreprocessConfig())
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        assert decode_and_preprocess(photo, PreprocessConfig()).shape == (224, 224, 3)
        with pytest.raises(ImageDecodeError, match=re.escape(BOMB_REASON)):
            decode_and_preprocess(header_only_png(30000, 30000), PreprocessConfig())
    # where a Pillow plugin checks Pillow's limit itself (a GIF frame larger than its screen), the reason names ours
    gif = header_only_gif(300, 300)
    screen_smaller_than_frame = gif[:6] + struct.pack("<HH", 20, 10) + gif[10:]
    with pytest.raises(ImageDecodeError, match=r"exceeds limit of 20000 pixels.*max_image_pixels is 64000000"):
        decode_and_preprocess(screen_smaller_than_frame, PreprocessConfig())
    assert Image.MAX_IMAGE_PIXELS == 10_000


# --- the error policy --------------------------------------------------------------------------
def test_on_error_raise_stops_at_the_first_bad_image_naming_tar_and_key(
    client, tiny_model: Path, tmp_path: Path
) -> None:
    jpeg = testing.encode_jpeg(testing.sample_photos(["astronaut"])["astronaut"])
    members = {"fine": {"jpg": jpeg}, "zero_bytes": {"jpg": b""}, "truncated": {"jpg": jpeg[: len(jpeg) // 2]}}
    testing.write_shard(tmp_path, 7, [row(key) for key in members], members)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    with pytest.raises(ShardReadError, match=r"00007\.tar: sample 'zero_bytes': empty image file \(0 bytes\)$"):
        ClipImageEmbedder(str(tiny_model), on_error="raise")(dataset).metadata.compute()
    recorded = ClipImageEmbedder(str(tiny_model))(dataset).metadata.compute().set_index("key")["embedding_error"]
    assert pd.isna(recorded["fine"]) and recorded["zero_bytes"] == "empty image file (0 bytes)"
    assert recorded["truncated"].startswith("cannot decode image: image file is truncated")


# --- bad shards --------------------------------------------------------------------------------
def member_offsets(tar: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member, in file order."""
    with tarfile.open(tar) as archive:
        return [(m.name, m.offset, m.offset_data) for m in archive.getmembers()]


def test_a_truncated_tar_fails_its_whole_shard_and_only_it(client, shards: Path, tiny_model: Path) -> None:
    """Cut inside a member's data, or exactly between members (where tarfile alone would see a
    shorter but complete tar): the shard's rows already read are not kept, the other shards embed."""
    name, _, data_offset = member_offsets(shards / "00001.tar")[3]
    (shards / "00001.tar").write_bytes((shards / "00001.tar").read_bytes()[: data_offset + 100])
    offsets = member_offsets(shards / "00003.tar")
    last_kept, header_offset = offsets[6][0], offsets[7][1]
    (shards / "00003.tar").write_bytes((shards / "00003.tar").read_bytes()[:header_offset])
    embedded = ClipImageEmbedder(str(tiny_model), autocast=False)(ImageTextPairDataset.from_webdataset(str(shards)))

    assert embedded.metadata.partitions[0].compute()["image_embedding"].notna().sum() == 5
    cut_in_data = rf"00001\.tar: cannot read tar \(at member '{name}'\): unexpected end of data$"
    with pytest.raises(ShardReadError, match=cut_in_data):
        embedded.metadata.partitions[1].compute()
    cut_between = (
        rf"00003\.tar: truncated or corrupt tar: empty header at byte {header_offset}, after member '{last_kept}', "
        "where the end-of-archive marker or a member header should be$"
    )
    with pytest.raises(ShardReadError, match=cut_between):
        embedded.metadata.partitions[2].compute()
    with pytest.raises(ShardReadError, match=r"0000[13]\.tar"):
        embedded.metadata.compute()


def test_unsafe_member_names_are_refused_naming_the_member(client, shards: Path, tiny_model: Path) -> None:
    jpeg = testing.encode_jpeg(np.zeros((8, 8, 3), dtype=np.uint8))
    for stem, name in (("00001", "../escape.jpg"), ("00003", "/etc/absolute.jpg")):
        with tarfile.open(shards / f"{stem}.tar", "a") as archive:
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            archive.addfile(info, io.BytesIO(jpeg))
    embedded = ClipImageEmbedder(str(tiny_model))(ImageTextPairDataset.from_webdataset(str(shards)))
    with pytest.raises(ShardReadError, match=r"00001\.tar: unsafe member name '\.\./escape\.jpg'"):
        embedded.metadata.partitions[1].compute()
    with pytest.raises(ShardReadError, match=r"00003\.tar: unsafe member name '/etc/absolute\.jpg'"):
        embedded.metadata.partitions[2].compute()


def test_a_tar_written_with_tar_cf_dot_keeps_its_keys(client, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    """``tar -cf shard.tar .`` names members ``./key.jpg``: the ``./`` is not part of the key."""
    import subprocess

    with tarfile.open(shards / "00001.tar") as archive:
        archive.extractall(tmp_path / "files", filter="data")
    subprocess.run(
        ["tar", "--sort=name", "-C", str(tmp_path / "files"), "-cf", str(shards / "00001.tar"), "."], check=True
    )
    with tarfile.open(shards / "00001.tar") as archive:
        assert all(name.startswith(".") for name in archive.getnames())
    frame = ClipImageEmbedder(str(tiny_model))(ImageTextPairDataset.from_webdataset(str(shards))).metadata.compute()
    assert frame["image_embedding"].notna().sum() == 15 and frame["embedding_error"].notna().sum() == 3


def test_an_unreadable_parquet_is_named_on_the_client_or_at_compute(client, shards: Path) -> None:
    (shards / "00003.parquet").write_bytes(b"PAR1 this is not a parquet file" * 4)
    dataset = ImageTextPairDataset.from_webdataset(str(shards))  # only the first shard's footer is read here
    with pytest.raises(ShardMetadataError, match=r"00003\.parquet: cannot read parquet: .*magic bytes not found"):
        dataset.metadata.compute()
    shutil.copy(shards / "00003.parquet", shards / "00000.parquet")
    with pytest.raises(ShardMetadataError, match=r"00000\.parquet: cannot read parquet footer: .*magic bytes"):
        ImageTextPairDataset.from_webdataset(str(shards))


def test_null_or_duplicate_ids_are_named(client, shards: Path) -> None:
    nulls = pq.read_table(shards / "00001.parquet").to_pandas()
    nulls.loc[2, "key"] = None
    pq.write_table(img2dataset_table(nulls), shards / "00001.parquet")
    duplicates = pq.read_table(shards / "00003.parquet").to_pandas()
    duplicates.loc[4, "key"] = duplicates.loc[0, "key"]
    pq.write_table(img2dataset_table(duplicates), shards / "00003.parquet")
    metadata = ImageTextPairDataset.from_webdataset(str(shards)).metadata
    with pytest.raises(ShardMetadataError, match=r"00001\.parquet: 1 null ids in 'key' \(rows \[2\]\)"):
        metadata.partitions[1].compute()
    duplicated_key = duplicates.loc[0, "key"]
    duplicate_ids = rf"00003\.parquet: 1 duplicate ids in 'key', e\.g\. \['{duplicated_key}'\]"
    with pytest.raises(ShardMetadataError, match=duplicate_ids):
        metadata.partitions[2].compute()


def img2dataset_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=testing.IMG2DATASET_SCHEMA, preserve_index=False)

"""Small shards and small random-weight CLIP models, for tests, notebooks, the demo and benchmarks.

Shards follow img2dataset's layout: per shard ``NNNNN.tar`` (``{key}.jpg``, ``{key}.txt``,
``{key}.json`` for successful samples only, not in key order), ``NNNNN.parquet`` (one row per input
row, failed downloads included) and ``NNNNN_stats.json``. Photos come from scikit-image.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dask_clip.io.vectors import to_disk

PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "moon",
    "page",
    "clock",
    "colorwheel",
    "brick",
    "grass",
    "gravel",
    "retina",
)

TRUNCATED_BYTES = 200
"""What ``make_img2dataset_shards`` keeps of a truncated JPEG: its first markers, no image data."""

MODEL_SHAPES: dict[str, dict[str, int]] = {
    # a model whose cost is negligible next to decoding
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=32,
        projection_dim=32,
    ),
    # the shape (not the weights) of OpenAI's ViT-B/32
    "vit-b-32": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=32,
        projection_dim=512,
    ),
    # the shape of OpenAI's ViT-L/14 (ci/gpu_check.py: the GPU throughput figures)
    "vit-l-14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        projection_dim=768,
    ),
}

IMG2DATASET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def sample_photos(names: Sequence[str] = PHOTO_NAMES) -> dict[str, np.ndarray]:
    """Real photos from scikit-image as ``uint8`` arrays ``(H, W, 3)`` (grey ones stacked to RGB)."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError('sample photos need scikit-image: pip install "dask_clip[demo]"') from error
    photos = {}
    for name in names:
        pixels = np.asarray(getattr(data, name)())
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(pixels[..., :3]).astype(np.uint8)
    return photos


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """``uint8 (H, W, 3)`` -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def img2dataset_key(shard_number: int, index: int, shard_digits: int = 5, index_digits: int = 4) -> str:
    """The key img2dataset gives row ``index`` of shard ``shard_number``: ``(1, 5)`` -> ``"000010005"``."""
    return f"{shard_number * 10**index_digits + index:0{shard_digits + index_digits}d}"


def write_shard(
    folder: str | Path,
    shard_number: int,
    rows: Sequence[Mapping[str, Any]],
    members: Mapping[str, Mapping[str, bytes]],
    tar_order: Sequence[str] | None = None,
    schema: pa.Schema = IMG2DATASET_SCHEMA,
    vector_layout: str | None = None,
) -> tuple[Path, Path]:
    """Write one shard: a parquet of ``rows`` and a tar holding ``members[key][extension]`` bytes.

    ``tar_order`` is the order of keys in the tar (default: as ``members`` iterates). ``vector_layout``
    (``io.vectors.LAYOUTS``) writes the ``fixed_size_list`` columns of ``schema`` as dask_clip would; None
    writes ``schema`` as it is. Returns the tar and parquet paths. Low level on purpose: tests build broken
    shards with it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{shard_number:05d}"
    table = pa.Table.from_pylist([dict(row) for row in rows], schema=schema)
    if vector_layout is not None:
        table, _ = to_disk(table, vector_layout)
    pq.write_table(table, folder / f"{stem}.parquet")
    with tarfile.open(folder / f"{stem}.tar", "w") as archive:
        for key in tar_order if tar_order is not None else list(members):
            for extension, payload in members[key].items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                info.mtime = 1_700_000_000
                archive.addfile(info, io.BytesIO(payload))
    successes = sum(1 for row in rows if row.get("status") == "success")
    stats = {"count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes}
    (folder / f"{stem}_stats.json").write_text(json.dumps(stats))
    return folder / f"{stem}.tar", folder / f"{stem}.parquet"


def make_img2dataset_shards(
    folder: str | Path,
    shard_numbers: Sequence[int] = (0, 1, 3),
    samples_per_shard: int = 6,
    failed_per_shard: int = 1,
    seed: int = 0,
    photos: Mapping[str, np.ndarray] | None = None,
    truncated_per_shard: int = 0,
) -> list[Path]:
    """Write shards like img2dataset's, from real photos at their original sizes.

    By default: shard numbers with a gap (0, 1, 3), one failed download per shard (a row with no
    image), and tar members in a shuffled order. Successive samples cycle through the photos,
    each cropped differently so that no two images are identical. ``truncated_per_shard`` samples of
    each shard are recorded as successes but their JPEG in the tar stops after ``TRUNCATED_BYTES`` (a
    download cut short: no image can be decoded from it). Returns the tar paths.
    """
    photos = dict(photos or sample_photos())
    names = list(photos)
    rng = random.Random(seed)
    tars = []
    counter = 0
    for shard_number in shard_numbers:
        rows, members = [], {}
        failed = set(rng.sample(range(samples_per_shard), min(failed_per_shard, samples_per_shard)))
        downloaded = [index for index in range(samples_per_shard) if index not in failed]
        truncated = (
            set(rng.sample(downloaded, min(truncated_per_shard, len(downloaded)))) if truncated_per_shard else set()
        )
        for index in range(samples_per_shard):
            key = img2dataset_key(shard_number, index)
            name = names[counter % len(names)]
            pixels = _distinct_crop(photos[name], counter)
            counter += 1
            url = f"file:///photos/{name}_{counter}.jpg"
            caption = f"a photo of {name.replace('_', ' ')}"
            if index in failed:
                rows.append(_row(url, caption, key, "failed_to_download", "HTTP Error 404: Not Found"))
                continue
            jpeg = encode_jpeg(pixels)
            if index in truncated:
                jpeg = jpeg[:TRUNCATED_BYTES]
            height, width = pixels.shape[:2]
            rows.append(_row(url, caption, key, "success", None, width, height, hashlib.sha256(jpeg).hexdigest()))
            sidecar = {
                "url": url,
                "caption": caption,
                "key": key,
                "status": "success",
                "width": width,
                "height": height,
            }
            members[key] = {"jpg": jpeg, "txt": caption.encode(), "json": json.dumps(sidecar).encode()}
        order = list(members)
        rng.shuffle(order)
        tar, _ = write_shard(folder, shard_number, rows, members, order)
        tars.append(tar)
    return tars


def _row(
    url: str,
    caption: str,
    key: str,
    status: str,
    error: str | None,
    width: int | None = None,
    height: int | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    return {
        "url": url,
        "caption": caption,
        "key": key,
        "status": status,
        "error_message": error,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": "{}" if status == "success" else None,
        "sha256": sha256,
    }


def _distinct_crop(pixels: np.ndarray, counter: int) -> np.ndarray:
    """Drop a few rows and columns (different for each ``counter``) so repeated photos differ."""
    trim = counter // 16 + 1
    return np.ascontiguousarray(pixels[trim * (counter % 3) :, : pixels.shape[1] - trim])


def save_random_clip_model(
    folder: str | Path, shape: str = "tiny", image_size: int = 224, seed: int = 0, projection_dim: int | None = None
) -> Path:
    """Save a random-weight CLIP of ``shape`` (``"tiny"``, ``"vit-b-32"`` or ``"vit-l-14"``) with ``save_pretrained``.

    ``projection_dim`` overrides the shape's embedding width.

    Writes a full ``CLIPModel`` as safetensors, ``config.json`` and the OpenAI
    ``preprocessor_config.json``. The embeddings are meaningless: use it to test plumbing, never to judge similarity.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    config = clip_config(shape, image_size, projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    folder = Path(folder)
    model.eval().save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def clip_config(shape: str = "tiny", image_size: int = 224, projection_dim: int | None = None) -> Any:
    """The transformers ``CLIPConfig`` of ``shape`` (``MODEL_SHAPES``; the text tower as wide and deep as the
    vision tower), for ``save_random_clip_model``."""
    from transformers import CLIPConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose from {sorted(MODEL_SHAPES)}")
    vision = dict(MODEL_SHAPES[shape], image_size=image_size)
    if projection_dim is not None:
        vision["projection_dim"] = projection_dim
    text = {k: v for k, v in vision.items() if k not in ("patch_size", "image_size")}
    text.update(vocab_size=49408, max_position_embeddings=77)
    return CLIPConfig(projection_dim=vision["projection_dim"], vision_config=vision, text_config=text)


def save_random_siglip_model(
    folder: str | Path, image_size: int = 224, seed: int = 0, with_tokenizer: bool = True
) -> Path:
    """Save a tiny random-weight ``SiglipModel`` (32-d embeddings) with its ``SiglipImageProcessor`` settings
    (a fixed-size resize, no crop, mean and std 0.5) and, when ``with_tokenizer``, a word-level fast tokenizer
    (``tokenizer.json``) padding with id 1. Meaningless embeddings: for testing plumbing only."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        vision_config=dict(tower, image_size=image_size, patch_size=32),
        text_config=dict(tower, vocab_size=512, max_position_embeddings=16, pad_token_id=1, eos_token_id=1),
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    SiglipModel(config).eval().save_pretrained(folder, safe_serialization=True)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    if with_tokenizer:
        _save_word_level_tokenizer(folder, vocab_size=512)
    return folder


def _save_word_level_tokenizer(folder: Path, vocab_size: int) -> None:
    """A lowercase word-level ``PreTrainedTokenizerFast``: ids 0 (unknown) and 1 (padding, end of text), then
    letters and common words; built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "a", "photo", "of", "the", "cat", "dog", "coffee"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert len(vocab) <= vocab_size
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="</s>", eos_token="</s>"
    ).save_pretrained(folder)


def write_transformers4_clip_config(model_dir: str | Path) -> Path:
    """Rewrite a CLIP folder's ``config.json`` as transformers 4 wrote full CLIPModels (LAION's checkpoints
    among them): the real ``projection_dim`` at the top level only, the towers' nested ``projection_dim`` left
    at the default 512, ``torch_dtype`` and an old ``transformers_version``; and its
    ``preprocessor_config.json`` as transformers 4's ``CLIPFeatureExtractor`` wrote it (plain integer sizes)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for tower in ("vision_config", "text_config"):
        config[tower]["projection_dim"] = 512
        config[tower].pop("dtype", None)
    config.pop("dtype", None)
    config.update(torch_dtype="float32", transformers_version="4.24.0.dev0", architectures=["CLIPModel"])
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    size = processor["crop_size"]["height"]
    legacy = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": processor["image_mean"],
        "image_std": processor["image_std"],
        "resample": 3,
        "size": size,
    }
    (model_dir / "preprocessor_config.json").write_text(json.dumps(legacy, indent=2))
    return model_dir


def save_tokenizer_for_clip_model(model_dir: str | Path) -> Path:
    """Save a byte-level ``CLIPTokenizer`` (built offline, no merges) into a CLIP ``save_pretrained`` folder.

    Start and end of text get the ids the model's ``text_config`` names (49406 and 49407 for
    ``save_random_clip_model``): the text tower pools the hidden state at the end-of-text token, so
    with any other id every caption would embed alike. Bytes take ids 0-511.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    config = json.loads((Path(model_dir) / "config.json").read_text())
    text_config = config.get("text_config", config)
    special = {"<|startoftext|>": text_config["bos_token_id"], "<|endoftext|>": text_config["eos_token_id"]}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    if any(i < len(vocab) for i in special.values()):
        raise ValueError(f"{model_dir}: special token ids {special} collide with the 512 byte tokens")
    CLIPTokenizer(vocab={**vocab, **special}, merges=[]).save_pretrained(model_dir)
    return Path(model_dir)


def write_embedding_shards(
    folder: str | Path,
    vectors: Mapping[str, np.ndarray | None],
    rows_per_shard: int,
    column: str = "image_embedding",
    vector_layout: str = "list",
) -> list[Path]:
    """Shards (``00000`` ...) whose parquets hold ``key`` and ``column``, a vector column written in
    ``vector_layout`` (``io.vectors.LAYOUTS``; ``list<float32>`` with its width in the footer by default).

    ``vectors`` maps each key to its vector (None: a null embedding), in row order; the tars are
    empty. For testing operations on embeddings with vectors of known similarity. Returns the parquets.
    """
    dim = len(next(v for v in vectors.values() if v is not None))
    schema = pa.schema([("key", pa.string()), (column, pa.list_(pa.float32(), dim))])
    items = list(vectors.items())
    parquets = []
    for shard, start in enumerate(range(0, len(items), rows_per_shard)):
        rows = [
            {"key": key, column: None if v is None else np.asarray(v, dtype=np.float32).tolist()}
            for key, v in items[start : start + rows_per_shard]
        ]
        parquets.append(write_shard(folder, shard, rows, {}, schema=schema, vector_layout=vector_layout)[1])
    return parquets


CONTAMINATION_EVAL_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "camera",
    "moon",
    "clock",
    "brick",
    "retina",
    "colorwheel",
)
"""The photos ``make_contamination_case`` puts in the evaluation folder; the other photos are training images only."""
CONTAMINATION_DISTINCT_PHOTOS = (
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "page",
    "grass",
    "gravel",
    "cell",
)
"""Photos none of which is in the evaluation folder, nor is another crop of one there (``skimage.data.cat`` is
``chelsea``: it is left out)."""


def make_contamination_case(
    folder: str | Path,
    qualities: Sequence[int] = (30, 60, 90),
    scales: Sequence[float] = (0.5, 0.75, 1.0, 1.5),
    crops: Sequence[float] = (0.9, 0.75, 0.5),
    rows_per_shard: int = 64,
) -> list[dict[str, Any]]:
    """An evaluation folder and training shards that hold planted copies of its photos, for decontamination.

    ``folder/eval`` holds ``CONTAMINATION_EVAL_PHOTOS`` as ``<name>.jpg`` (quality 90, at most 512 px a side, as
    every photo here). ``folder/shards`` holds, for each of those photos and each of
    ``CONTAMINATION_DISTINCT_PHOTOS`` (none of which is in the evaluation folder), a copy resized by each of
    ``scales`` and re-encoded at each of ``qualities`` (kind ``reencoded`` at scale 1, else ``resized``), and a
    centre crop keeping each of ``crops`` of its sides (kind ``crop``, quality 90). Returns one dict per training
    row: ``key``, ``kind``, ``photo`` and whether it is a ``copy`` of an evaluation photo."""
    folder = Path(folder)
    photos = sample_photos(CONTAMINATION_EVAL_PHOTOS + CONTAMINATION_DISTINCT_PHOTOS)
    photos = {name: _at_most(pixels, 512) for name, pixels in photos.items()}
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    for name in CONTAMINATION_EVAL_PHOTOS:
        (folder / "eval" / f"{name}.jpg").write_bytes(encode_jpeg(photos[name]))
    planted: list[tuple[str, str, bytes]] = []
    for name, pixels in photos.items():
        height, width = pixels.shape[:2]
        for scale in scales:
            size = (max(16, round(width * scale)), max(16, round(height * scale)))
            resized = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
            for quality in qualities:
                planted.append((name, "reencoded" if scale == 1 else "resized", encode_jpeg(resized, quality)))
        for keep in crops:
            top, left = round(height * (1 - keep) / 2), round(width * (1 - keep) / 2)
            cropped = pixels[top : top + round(height * keep), left : left + round(width * keep)]
            planted.append((name, "crop", encode_jpeg(np.ascontiguousarray(cropped))))
    rows = []
    for start in range(0, len(planted), rows_per_shard):
        shard_rows, members = [], {}
        for index, (name, kind, jpeg) in enumerate(planted[start : start + rows_per_shard]):
            key = img2dataset_key(start // rows_per_shard, index)
            caption = f"{kind} {name}"
            digest = hashlib.sha256(jpeg).hexdigest()
            shard_rows.append(_row(f"file:///{name}.jpg", caption, key, "success", None, sha256=digest))
            members[key] = {"jpg": jpeg, "txt": caption.encode()}
            rows.append({"key": key, "kind": kind, "photo": name, "copy": name in CONTAMINATION_EVAL_PHOTOS})
        write_shard(folder / "shards", start // rows_per_shard, shard_rows, members)
    return rows


def _at_most(pixels: np.ndarray, side: int) -> np.ndarray:
    """``uint8 (H, W, 3)`` shrunk to at most ``side`` pixels on its longer side."""
    image = Image.fromarray(pixels)
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    return np.asarray(image)

"""ClipImageEmbedder(engine="openvino"): agreement with torch on real photos, the converted-model cache on disk, the
error without the extra, and the engine recorded as a property of a column, not as its identity."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, testing
from dask_clip.dataset.consistency import check_consumed
from dask_clip.errors import MissingDependencyError
from dask_clip.images.preprocess import decode_and_preprocess
from dask_clip.models import openvino as engine
from dask_clip.models.clip import ImageModelDescription
from dask_clip.provenance import FileRecords, digest

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason='needs the openvino extra: pip install "dask_clip[openvino]"'
)


def described(embedder: ClipImageEmbedder) -> ImageModelDescription:
    return ImageModelDescription(embedder.description.family, embedder.embedding_dim, embedder.preprocess)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@needs_openvino
def test_openvino_agrees_with_torch_fp32_on_real_photos_and_converts_once(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversions = []
    convert = engine.convert
    monkeypatch.setattr(engine, "convert", lambda *args: conversions.append(args[2]) or convert(*args))
    torch_fp32 = ClipImageEmbedder(str(tiny_model), autocast=False, decode_mode="exact")
    photos = [testing.encode_jpeg(pixels) for pixels in testing.sample_photos().values()]
    crops = [decode_and_preprocess(photo, torch_fp32.preprocess) for photo in photos]
    reference = torch_fp32.load_model().embed(crops)
    cache = str(tmp_path / "cache")
    for precision, threshold in (("fp32", 0.9999), ("bf16", 0.999), ("fp32", 0.9999)):
        model = engine.OpenVinoVisionModel(str(tiny_model), described(torch_fp32), precision, cache)
        found = cosines(model.embed(crops), reference)
        assert found.min() >= threshold, (precision, found.min())
        assert model.smallest_cosine >= threshold  # what it measured on its probe images when converted
    assert conversions == ["fp32"]  # bf16 runs the fp32 model; the second fp32 load found it on disk
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        engine.conversion_key(str(tiny_model), "CLIP", "fp32", torch_fp32.preprocess)
    ]


@needs_openvino
def test_the_cache_key_names_the_weights_precision_and_shape(tiny_model: Path, tmp_path: Path) -> None:
    preprocess = ClipImageEmbedder(str(tiny_model)).preprocess
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    key = engine.conversion_key(str(tiny_model), "CLIP", "fp32", preprocess)
    assert engine.conversion_key(str(copy), "CLIP", "fp32", preprocess) == key  # the same weights elsewhere
    assert engine.conversion_key(str(copy), "CLIP", "bf16", preprocess) == key  # runs the fp32 model
    assert engine.conversion_key(str(copy), "CLIP", "int8", preprocess) != key
    bigger = dataclasses.replace(preprocess, crop_height=336, crop_width=336)
    assert engine.conversion_key(str(copy), "CLIP", "fp32", bigger) != key
    testing.save_random_clip_model(copy, seed=1)  # other weights under the same name
    assert engine.conversion_key(str(copy), "CLIP", "fp32", preprocess) != key


def test_without_openvino_the_error_names_the_extra(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(
        MissingDependencyError, match=r'engine=.openvino. needs openvino: pip install "dask_clip\[openvino\]"'
    ):
        ClipImageEmbedder(str(tiny_model), engine="openvino")


def test_openvino_options_are_checked_on_the_client(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        ClipImageEmbedder(str(tiny_model), engine="onnx")
    with pytest.raises(ValueError, match="precision='int8' needs engine='openvino'"):
        ClipImageEmbedder(str(tiny_model), precision="int8")


@needs_openvino
def test_torch_and_openvino_shards_make_one_column(
    client, embedded_shards: Path, pristine_shards: Path, model_with_tokenizer: Path, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    options = {"autocast": False, "engine": "openvino", "engine_cache_dir": cache}
    openvino = ClipImageEmbedder(str(model_with_tokenizer), **options)
    openvino.load_model()  # converted here once, so that the two workers only load it
    assert openvino.recorded_config() == ClipImageEmbedder(str(model_with_tokenizer), autocast=False).recorded_config()

    # the shards embedded by torch are what an OpenVINO run would write: it finishes them, never redoes them
    summary = openvino(ImageTextPairDataset.from_webdataset(str(embedded_shards))).save_metadata()
    assert not summary["written"].any()

    # one shard computed by OpenVINO among shards computed by torch: one column, each shard naming its engine
    by_openvino = Path(shutil.copytree(pristine_shards, tmp_path / "openvino"))
    assert openvino(ImageTextPairDataset.from_webdataset(str(by_openvino))).save_metadata()["written"].all()
    shutil.copy(by_openvino / "00001.parquet", embedded_shards / "00001.parquet")
    engines = {
        path.stem: FileRecords.from_schema(pq.read_schema(path)).properties["image_embedding"]["engine"]
        for path in sorted(embedded_shards.glob("*.parquet"))
    }
    assert engines == {"00000": "torch", "00001": "openvino", "00003": "torch"}
    mixed = ImageTextPairDataset.from_webdataset(str(embedded_shards))
    (operation,) = check_consumed(mixed, ["image_embedding"], "a test").values()
    assert operation == openvino.recorded_config()
    all_openvino = ImageTextPairDataset.from_webdataset(str(by_openvino)).metadata.compute()["image_embedding"]
    mixed_column = mixed.metadata.compute()["image_embedding"]
    assert (mixed_column.isna() == all_openvino.isna()).all()
    valid = mixed_column.notna().to_numpy()
    found = cosines(embeddings_to_numpy(mixed_column)[valid], embeddings_to_numpy(all_openvino)[valid])
    assert found.min() >= 0.9999 and found.max() <= 1 + 1e-6


def test_moved_rows_keep_their_engines() -> None:
    from dask_clip.dataset.reshard import moved_records

    record = {"operation": {"class": "ClipImageEmbedder"}, "shard": {}, "reads": {}, "reasons": {}}
    by = {
        name: FileRecords("key", {}, {"v": record}, properties={"v": {"engine": name}})
        for name in ("torch", "openvino")
    }
    identity = {"rows": 2, "ids": "x"}
    assert moved_records([by["torch"], by["torch"]], identity, "key").properties == {"v": {"engine": "torch"}}
    mixed = moved_records([by["torch"], by["openvino"]], identity, "key")
    assert mixed.properties == {"v": {"mixed": sorted([{"engine": "torch"}, {"engine": "openvino"}], key=digest)}}
    assert mixed.columns["v"]["operation"] == record["operation"]  # one column, whichever engine computed its rows


def test_an_int8_column_is_recomputed_with_int8() -> None:
    from dask_clip.dataset.consistency import rerun_command
    from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS

    operation = {"class": "ClipImageEmbedder", "model_dir": "m", "autocast": True, "decode_mode": "fast"}
    operation["max_image_pixels"] = DEFAULT_MAX_IMAGE_PIXELS
    assert rerun_command(operation, "d") == "dask-clip embed d --model-dir m"
    assert (
        rerun_command({**operation, "precision": "int8"}, "d")
        == "dask-clip embed d --model-dir m --engine openvino --int8"
    )

"""ClipTextEmbedder and clip_score on a real 2-worker LocalCluster, against transformers' own CLIPModel."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from dask_clip import (
    ClipImageEmbedder,
    ClipTextEmbedder,
    ImageTextPairDataset,
    clip_score,
    embeddings_to_numpy,
    testing,
)
from dask_clip.errors import ColumnError, ModelLoadError

LONG_PREFIX = "a very long caption " * 10  # 200 characters: one token per byte, so far beyond 77 tokens
CAPTIONS = {
    "astronaut": "a photo of an astronaut",
    "coffee": "A cup of COFFEE, on a table!",
    "chelsea": "a cat",
    "rocket": "",
    "camera": None,
    "long_a": LONG_PREFIX + "ending one way",
    "long_b": LONG_PREFIX + "ending another way",
}


@pytest.fixture(scope="module")
def captioned_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of real photos with the captions above, plus a failed download (caption, no image)."""
    folder = tmp_path_factory.mktemp("captioned")
    photos = testing.sample_photos(["astronaut", "coffee", "chelsea", "rocket", "camera"])
    names = [*list(CAPTIONS), "failed"]
    for shard, batch in enumerate([names[:4], names[4:]]):
        rows, members = [], {}
        for index, name in enumerate(batch):
            key = testing.img2dataset_key(shard, index)
            caption = CAPTIONS.get(name, "a failed download")
            image = photos.get(name) if name in photos else (photos["astronaut"] if name.startswith("long") else None)
            status = "success" if image is not None else "failed_to_download"
            rows.append({"key": key, "caption": caption, "status": status, "url": name})
            if image is not None:
                members[key] = {"jpg": testing.encode_jpeg(image)}
        testing.write_shard(folder, shard, rows, members)
    return folder


def transformers_text_features(model_dir: Path, captions: list[str]) -> np.ndarray:
    """transformers' own answer: the tokenizer + CLIPModel.get_text_features, one caption at a time, normalised."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for caption in captions:
        tokens = tokenizer([caption], truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            features = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        vector = getattr(features, "pooler_output", features)[0].numpy()
        out.append(vector / np.linalg.norm(vector))
    return np.stack(out)


def test_text_embeddings_match_transformers(client, captioned_shards: Path, model_with_tokenizer: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(captioned_shards))
    embedded = ClipTextEmbedder(str(model_with_tokenizer), batch_size=2)(dataset)
    assert embedded.metadata.npartitions == 2
    assert str(embedded.metadata.dtypes["text_embedding"]) == "fixed_size_list<item: float>[32][pyarrow]"
    frame = embedded.metadata.compute().set_index("url")
    vectors = dict(zip(frame.index, embeddings_to_numpy(frame["text_embedding"]), strict=True))

    assert np.isnan(vectors["camera"]).all()  # null caption -> null embedding
    present = [name for name in frame.index if name != "camera"]
    reference = transformers_text_features(model_with_tokenizer, [frame.loc[name, "caption"] for name in present])
    for name, expected in zip(present, reference, strict=True):
        assert float(vectors[name] @ expected) >= 0.9999, name
        assert np.linalg.norm(vectors[name]) == pytest.approx(1, abs=1e-5)
    # truncation at 77 tokens: captions that differ only after the cut embed alike, others differ
    assert float(vectors["long_a"] @ vectors["long_b"]) == pytest.approx(1, abs=1e-6)
    distinct = np.stack([vectors[n] for n in ["astronaut", "coffee", "chelsea", "rocket", "long_a", "failed"]])
    cosines = distinct @ distinct.T
    assert (cosines[~np.eye(len(distinct), dtype=bool)] < 0.999).all()


def test_a_rerun_keeps_shards_whose_only_nulls_are_null_captions(
    client, captioned_shards: Path, model_with_tokenizer: Path, tmp_path: Path
) -> None:
    embedder = ClipTextEmbedder(str(model_with_tokenizer), batch_size=2)
    first = embedder(ImageTextPairDataset.from_webdataset(str(captioned_shards))).save_metadata(str(tmp_path))
    again = embedder(ImageTextPairDataset.from_webdataset(str(captioned_shards))).save_metadata(str(tmp_path))
    assert list(first["written"]) == [True, True]
    assert list(again["written"]) == [False, False], "the shard with a null caption was recomputed"


def test_weights_replaced_in_place_are_loaded_again_by_a_long_lived_process(
    captioned_shards: Path, model_with_tokenizer: Path, tmp_path: Path
) -> None:
    """The model cache's key names the weights' version that ``config()`` records, so a process that embedded
    with the old weights loads the new ones once they replace the old in the same folder."""
    folder = Path(shutil.copytree(model_with_tokenizer, tmp_path / "model"))
    dataset = ImageTextPairDataset.from_webdataset(str(captioned_shards))

    def embed() -> tuple[ClipTextEmbedder, pd.DataFrame]:
        embedder = ClipTextEmbedder(str(folder))
        with dask.config.set(scheduler="synchronous"):  # this process's model cache, as a worker's
            return embedder, embedder(dataset).metadata.compute().set_index("url").drop(index="camera")

    old_version = embed()[0].config()["model_version"]
    testing.save_random_clip_model(folder, shape="tiny", seed=1)  # other weights, same files, tokenizer kept
    new, frame = embed()
    assert new.config()["model_version"] != old_version
    reference = transformers_text_features(folder, list(frame["caption"]))
    cosines = (embeddings_to_numpy(frame["text_embedding"]) * reference).sum(axis=1)
    assert (cosines >= 0.9999).all(), "the old weights, still cached, embedded the captions"


def test_clip_score_is_the_cosine_or_null(client, captioned_shards: Path, model_with_tokenizer: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(captioned_shards))
    images = ClipImageEmbedder(str(model_with_tokenizer), autocast=False)(dataset)
    both = ClipTextEmbedder(str(model_with_tokenizer))(images)
    scored = clip_score(both)
    assert scored.metadata.npartitions == 2
    frame = scored.metadata.compute().set_index("url")
    assert str(frame["clip_score"].dtype) == "float[pyarrow]"
    image_vectors = embeddings_to_numpy(frame["image_embedding"])
    text_vectors = embeddings_to_numpy(frame["text_embedding"])
    for position, name in enumerate(frame.index):
        value = frame.loc[name, "clip_score"]
        if name in ("camera", "failed"):  # no caption / no image
            assert pd.isna(value), name
        else:
            assert value == pytest.approx(float(image_vectors[position] @ text_vectors[position]), abs=1e-5), name
    assert frame["clip_score"].notna().sum() == 6
    assert scored.provenance["clip_score"].operation["text_column"] == "text_embedding"


def test_clip_score_needs_matching_widths(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path, {"a": np.ones(4), "b": np.ones(4)}, rows_per_shard=2)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    meta = dataset.metadata._meta.assign(text_embedding=pd.Series([], dtype=pd.ArrowDtype(pa.list_(pa.float32(), 6))))
    wider = dataset.with_metadata(dataset.metadata.map_partitions(lambda rows: rows, meta=meta))  # never computed
    with pytest.raises(ValueError, match=r"'image_embedding' holds 4-d .* 'text_embedding' holds 6-d"):
        clip_score(wider)
    with pytest.raises(ColumnError, match="'text_embedding'"):
        clip_score(dataset)


def test_missing_tokenizer_and_caption_column_are_errors(
    tiny_model: Path, model_with_tokenizer: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        ClipTextEmbedder(str(tiny_model))
    testing.write_embedding_shards(tmp_path, {"a": np.ones(4)}, rows_per_shard=1)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    with pytest.raises(ColumnError, match="'caption'"):
        ClipTextEmbedder(str(model_with_tokenizer))(dataset)

"""NeMo Curator's documented embedder examples, with dask_clip's classes in place of NeMo's: only the import changes.

Where an example names a model this machine cannot download (NeMo's ``model_dir="/path/to/models"``), the tiny
random-weight CLIP the tests build stands in for it (``MODEL_DIR``). A step's ``name`` is a label: it names its
tasks and log lines, never its output, so renaming a step recomputes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import pytest
from dask.utils import key_split

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, TimmImageEmbedder, embeddings_to_numpy
from dask_clip import ClipImageEmbedder as ImageEmbeddingStage
from dask_clip.distributed.model_cache import clear_local_cache


@pytest.fixture
def MODEL_DIR(tiny_model: Path) -> str:
    return str(tiny_model)


def test_the_clip_stage_examples_take_their_options(MODEL_DIR: str) -> None:
    """The usage example of NeMo's "CLIP ImageEmbeddingStage" page, then its image concepts page."""
    usage = ImageEmbeddingStage(
        model_dir=MODEL_DIR,
        model_inference_batch_size=32,
        num_gpus_per_worker=0.25,
        remove_image_data=False,
        verbose=True,
    )
    concepts = ImageEmbeddingStage(
        model_dir=MODEL_DIR,
        model_inference_batch_size=32,
        num_gpus_per_worker=0.25,
        remove_image_data=False,
    )
    plain = ClipImageEmbedder(MODEL_DIR)
    for example in (usage, concepts):
        assert (example.batch_size, example.task_resources()) == (32, {"GPU": 0.25})
        assert example.config() == plain.config() and example.model.cache_key == plain.model.cache_key
    assert usage.verbose and not concepts.verbose


def test_the_named_clip_stage_example_embeds_and_logs_under_its_name(
    shards: Path,
    MODEL_DIR: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stage = ImageEmbeddingStage(
        model_dir=MODEL_DIR, model_inference_batch_size=64, remove_image_data=True, verbose=True, name="clip_embedder"
    )
    assert stage.batch_size == 64
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    embedded = stage(dataset)
    assert "clip_embedder" in {key_split(key) for key in embedded.metadata.__dask_graph__()}
    clear_local_cache()  # an earlier test may have loaded the same model in this process: it is loaded and logged here
    with caplog.at_level(logging.INFO, logger="dask_clip"), dask.config.set(scheduler="synchronous"):
        frame = embedded.metadata.compute()
    assert frame["image_embedding"].notna().sum() == (frame["status"] == "success").sum() > 0
    assert embeddings_to_numpy(frame["image_embedding"]).shape == (len(frame), 32)
    assert any(message.startswith("clip_embedder: loading CLIP vision model") for message in caplog.messages)
    per_shard = [message for message in caplog.messages if message.startswith("clip_embedder: ")]
    assert sum(".tar: 6 rows" in message for message in per_shard) == len(dataset.shards)


def test_renaming_a_step_recomputes_nothing(client, shards: Path, MODEL_DIR: str, tmp_path: Path) -> None:
    first = ClipImageEmbedder(MODEL_DIR, name="first try")
    renamed = ClipImageEmbedder(MODEL_DIR, name="renamed")
    assert renamed.label == "renamed" and ClipImageEmbedder(MODEL_DIR).label == "ClipImageEmbedder"
    assert renamed.model.cache_key == first.model.cache_key
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    recorded = [step(dataset).provenance["image_embedding"].operation for step in (first, renamed)]
    assert recorded[0] == recorded[1]
    written = first(dataset).save_metadata(str(tmp_path))
    again = renamed(dataset).save_metadata(str(tmp_path))
    assert list(written["written"]) == [True] * len(dataset.shards)
    assert list(again["written"]) == [False] * len(dataset.shards), "a renamed step recomputed its column"


def test_the_dask_era_timm_example_takes_its_options() -> None:
    """NeMo Curator 0.x's ``TimmImageEmbedder`` example, built as written: describing the model reads no weights.
    It is not run: ``pretrained=True`` downloads the weights on each worker."""
    pytest.importorskip("timm")
    embedding_model = TimmImageEmbedder(
        "vit_large_patch14_clip_quickgelu_224.openai",
        pretrained=True,
        batch_size=1024,
        num_threads_per_worker=16,
        normalize_embeddings=True,
    )
    assert (embedding_model.embedding_dim, embedding_model.batch_size) == (768, 1024)
    assert embedding_model.embedding_column == "image_embedding"
    assert embedding_model.config()["pretrained"] is True

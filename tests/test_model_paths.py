"""One model, one identity: every spelling of a local model folder or checkpoint file is recorded as its real
path, so re-spelling it recomputes nothing and leaves an index current."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dask_clip import AestheticClassifier, ClipImageEmbedder, ClipTextEmbedder, ImageTextPairDataset, testing
from dask_clip.models.classifiers import AestheticMlp
from dask_clip.models.loading import resolved_model_path


@pytest.fixture
def in_work_folder(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory holds ``work/clip32`` (the tiny CLIP, with a tokenizer) and ``link`` pointing to it."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "work" / "clip32"))
    testing.save_tokenizer_for_clip_model(model)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    return model


def spellings(model: Path) -> list[str]:
    return ["work/clip32", str(model), "work/clip32/", "./work/../work/clip32", "link", str(model) + os.sep]


def test_every_spelling_of_a_model_folder_is_recorded_as_its_real_path(in_work_folder: Path) -> None:
    real = os.path.realpath(in_work_folder)
    for spelling in spellings(in_work_folder):
        assert ClipImageEmbedder(spelling).config()["model_dir"] == real, spelling
        assert ClipTextEmbedder(spelling).config()["model_dir"] == real, spelling
    assert resolved_model_path("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"  # a hub id


def test_every_spelling_of_a_checkpoint_file_is_recorded_as_its_real_path(in_work_folder: Path) -> None:
    torch.save(AestheticMlp().state_dict(), "work/aesthetic.pth")
    real = os.path.realpath("work/aesthetic.pth")
    for spelling in ("work/aesthetic.pth", "./work/aesthetic.pth", "link/../aesthetic.pth", real):
        assert AestheticClassifier(spelling).config()["model_path"] == real, spelling
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from dask_clip.embedders.timm import TimmImageEmbedder

    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=8).state_dict(), "work/timm.safetensors")
    embedder = TimmImageEmbedder("vit_tiny_patch16_224", checkpoint_path="work/timm.safetensors")
    assert embedder.config()["checkpoint_path"] == os.path.realpath("work/timm.safetensors")
    assert embedder.config()["model_name"] == "vit_tiny_patch16_224"  # a timm name, not a path


def test_respelling_the_model_recomputes_nothing_and_keeps_the_index_current(
    client, in_work_folder: Path, pristine_shards: Path, tmp_path: Path
) -> None:
    folder = str(shutil.copytree(pristine_shards, tmp_path / "shards"))
    first = ClipImageEmbedder("work/clip32", autocast=False)(ImageTextPairDataset.from_webdataset(folder))
    assert first.save_metadata()["written"].all()
    index = str(tmp_path / "index")
    ImageTextPairDataset.from_webdataset(folder).build_index(index)
    for spelling in (str(in_work_folder), "work/clip32/"):
        again = ClipImageEmbedder(spelling, autocast=False)(ImageTextPairDataset.from_webdataset(folder))
        assert not again.save_metadata()["written"].any(), spelling  # every shard finished: nothing recomputed
    saved = ImageTextPairDataset.from_webdataset(folder)
    hits = saved.search(image=np.ones(32, dtype=np.float32), k=3, index=index)  # not stale
    assert len(hits) == 3

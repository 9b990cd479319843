"""GPU packing and placement, checked on CPU workers that offer a ``GPU`` resource: only embedding tasks ask for
it, each for the embedder's share, so a GPU worker with four threads runs four of them at once while
reading, shuffling and summing run on any worker."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster, Worker
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_clip import (
    AestheticClassifier,
    ClipImageEmbedder,
    ClipTextEmbedder,
    ImageTextPairDataset,
    NsfwClassifier,
    TimmImageEmbedder,
    testing,
)
from dask_clip.errors import UsageError
from dask_clip.execution import compute, map_shards, optimized_with_resources
from dask_clip.models.classifiers import AestheticMlp, NsfwMlp
from dask_clip.operation import ModelOperation


class Placements(SchedulerPlugin):
    """Each task the scheduler starts: its key's name, the resources it asks for and the worker it runs on."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.started: list[tuple[str, dict, str]] = []

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "processing":
            task = self.scheduler.tasks[key]
            name = key[0] if isinstance(key, tuple) else key
            self.started.append((name, dict(task.resource_restrictions or {}), task.processing_on.name))


@pytest.fixture
def gpu_and_cpu_workers():
    """A cluster in this process: worker "gpu" (4 threads, resource GPU=1) and worker "cpu" (no resources)."""
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        cluster.worker_spec["gpu"] = {"cls": Worker, "options": {"nthreads": 4, "resources": {"GPU": 1}}}
        cluster.worker_spec["cpu"] = {"cls": Worker, "options": {"nthreads": 2}}
        cluster.sync(cluster._correct_state)
        with Client(cluster) as client:
            client.wait_for_workers(2)
            plugin = Placements(cluster.scheduler)
            cluster.scheduler.add_plugin(plugin)  # the scheduler runs in this process
            yield client, plugin


def test_only_embedding_tasks_ask_for_the_gpu(gpu_and_cpu_workers, pristine_shards: Path, tiny_model, tmp_path) -> None:
    _, placements = gpu_and_cpu_workers
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    embedded = ClipImageEmbedder(model_dir=str(tiny_model), device=None, batch_size=4)(dataset)

    embedded_rows = compute(embedded.metadata.image_embedding.count())
    assert embedded_rows == compute((dataset.metadata.status == "success").sum()) > 0

    embedding = [(name, wanted, worker) for name, wanted, worker in placements.started if wanted]
    others = [(name, worker) for name, wanted, worker in placements.started if not wanted]
    assert len(embedding) == len(dataset.shards)  # one per shard, each asking for the embedder's share
    assert all(wanted == {"GPU": 0.25} and worker == "gpu" for _, wanted, worker in embedding)
    assert others, "the reduction and the shard references must not ask for the GPU"

    placements.started.clear()
    embedded.save_metadata(str(tmp_path / "out"))  # shard by shard, through compute_per_shard
    saved = [(wanted, worker) for _, wanted, worker in placements.started if wanted]
    assert len(saved) == len(dataset.shards) and all(worker == "gpu" for _, worker in saved)
    assert any(not wanted for _, wanted, _ in placements.started)
    written = pd.read_parquet(tmp_path / "out")
    assert written.image_embedding.notna().sum() == (written.status == "success").sum()


def test_a_fused_task_asks_for_what_its_embedding_part_asks_for(pristine_shards: Path, tiny_model) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    embedded = ClipImageEmbedder(model_dir=str(tiny_model), device=None)(dataset)
    frame = embedded.metadata.assign(width=embedded.metadata.key.str.len())  # fused with the embedding
    optimized, resources = optimized_with_resources(frame.width.sum())
    graph = optimized.__dask_graph__()
    asking = {key for key in graph if resources(key)}
    assert len(asking) == len(dataset.shards)
    assert all(resources(key) == {"GPU": 0.25} for key in asking)
    assert len(graph) > len(asking)  # the sum and the shard references ask for nothing

    plain = ClipImageEmbedder(model_dir=str(tiny_model), device="cpu")(dataset)
    assert not optimized_with_resources(plain.metadata)[1].by_name  # a CPU embedder asks for no GPU


def test_two_steps_fused_into_one_task_ask_for_the_larger_share(pristine_shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))

    def unchanged(rows, task):
        return rows

    def step(frame, share):
        return map_shards(unchanged, frame, dataset.shards, dataset.meta, id_col="key", resources={"GPU": share})

    _, resources = optimized_with_resources(step(step(dataset.pandas_metadata, 0.5), 0.25))
    assert list(resources.by_name.values()) == [{"GPU": 0.5}]


@pytest.mark.parametrize("share", [2, -0.5, "all"])
def test_a_gpu_share_outside_0_to_1_is_refused(tiny_model, share) -> None:
    with pytest.raises(UsageError, match="num_gpus_per_worker must be a number from 0 to 1"):
        ClipImageEmbedder(model_dir=str(tiny_model), num_gpus_per_worker=share)


@pytest.fixture(scope="module")
def model_steps(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Callable[..., ModelOperation]]:
    """Every step that runs a model, by class name: a function of its keyword options, on tiny local weights."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("model-steps")
    text_model = testing.save_tokenizer_for_clip_model(shutil.copytree(tiny_model, folder / "clip"))
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=8).state_dict(), str(folder / "timm.safetensors"))
    torch.save(AestheticMlp(32).state_dict(), folder / "aesthetic.pth")
    torch.save(NsfwMlp(32).state_dict(), folder / "nsfw.pth")
    return {
        "ClipImageEmbedder": lambda **options: ClipImageEmbedder(str(tiny_model), **options),
        "TimmImageEmbedder": lambda **options: TimmImageEmbedder(
            "vit_tiny_patch16_224",
            checkpoint_path=str(folder / "timm.safetensors"),
            model_kwargs={"num_classes": 8},
            **options,
        ),
        "ClipTextEmbedder": lambda **options: ClipTextEmbedder(str(text_model), **options),
        "AestheticClassifier": lambda **options: AestheticClassifier(
            str(folder / "aesthetic.pth"), embedding_dim=32, **options
        ),
        "NsfwClassifier": lambda **options: NsfwClassifier(str(folder / "nsfw.pth"), embedding_dim=32, **options),
    }


@pytest.mark.parametrize(
    "kind", ["ClipImageEmbedder", "TimmImageEmbedder", "ClipTextEmbedder", "AestheticClassifier", "NsfwClassifier"]
)
def test_every_step_with_a_model_asks_for_its_gpu_share_unless_on_the_cpu(model_steps, kind: str) -> None:
    build = model_steps[kind]
    assert build().task_resources() == {"GPU": 0.25}  # device None: CUDA where the worker has it
    assert build(device="cuda", num_gpus_per_worker=0.5).task_resources() == {"GPU": 0.5}
    assert build(device="cpu").task_resources() == {}
    with pytest.raises(UsageError, match="num_gpus_per_worker must be a number from 0 to 1"):
        build(num_gpus_per_worker=2)


def test_a_classifiers_tasks_ask_for_the_gpu_as_an_embedders_do(model_steps, tmp_path: Path) -> None:
    vectors = {f"k{i}": np.random.default_rng(i).normal(size=32) for i in range(4)}
    testing.write_embedding_shards(tmp_path, vectors, rows_per_shard=2)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    on_gpu = model_steps["AestheticClassifier"]()(dataset)
    assert list(optimized_with_resources(on_gpu.metadata)[1].by_name.values()) == [{"GPU": 0.25}]
    on_cpu = model_steps["AestheticClassifier"](device="cpu")(dataset)
    assert not optimized_with_resources(on_cpu.metadata)[1].by_name

"""Shared fixtures: generated shards, random-weight CLIP models and a real 2-worker LocalCluster."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dask_clip import testing

from .helpers import DemoRun

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight full CLIPModel (projection size 32) saved with save_pretrained."""
    return testing.save_random_clip_model(tmp_path_factory.mktemp("tiny-clip"), shape="tiny")


@pytest.fixture(scope="session")
def model_with_tokenizer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random CLIP plus a byte-level tokenizer (no tokenizer can be downloaded here)."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("clip-with-tokenizer") / "model"))
    return testing.save_tokenizer_for_clip_model(folder)


@pytest.fixture(scope="session")
def pristine_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards 00000, 00001, 00003 (a gap) of 6 rows, one failed download each, tar keys shuffled."""
    return testing.make_img2dataset_shards(tmp_path_factory.mktemp("pristine"))[0].parent


@pytest.fixture
def shards(pristine_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine shards, free to overwrite."""
    return Path(shutil.copytree(pristine_shards, tmp_path / "shards"))


@pytest.fixture(scope="session")
def pristine_embedded(pristine_shards: Path, model_with_tokenizer: Path, tmp_path_factory) -> Iterator[Path]:
    """The pristine shards with ``image_embedding`` saved next to them by ``model_with_tokenizer`` (15 vectors,
    3 failed downloads), embedded once per session on whichever scheduler is current. Never change it: take
    ``embedded_shards`` to write; the session ends with an error naming any file a test changed here."""
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset

    folder = Path(shutil.copytree(pristine_shards, tmp_path_factory.mktemp("embedded") / "shards"))
    ClipImageEmbedder(str(model_with_tokenizer), autocast=False)(
        ImageTextPairDataset.from_webdataset(str(folder))
    ).save_metadata()
    saved = file_states(folder)
    yield folder
    changed = sorted({name for name, _ in set(saved.items()) ^ set(file_states(folder).items())})
    assert not changed, f"a test changed {changed} in the shared embedded shards: take embedded_shards to write"


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's name -> (size, modification time in ns)."""
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


@pytest.fixture
def embedded_shards(pristine_embedded: Path, tmp_path: Path) -> Path:
    """A private copy of the embedded shards, free to overwrite."""
    return Path(shutil.copytree(pristine_embedded, tmp_path / "embedded"))


@pytest.fixture(scope="session")
def deduplicated(pristine_embedded: Path, tmp_path_factory: pytest.TempPathFactory, client) -> Path:
    """The embedded shards, deduplicated with a loose eps so that the random model makes groups (the app's data)."""
    from dask_clip import ImageTextPairDataset, SemanticDeduplicator

    folder = Path(shutil.copytree(pristine_embedded, tmp_path_factory.mktemp("served") / "shards"))
    SemanticDeduplicator(n_clusters=1, eps=0.3)(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """``dask-clip demo --random-weights`` as the README runs it: a process of its own, on its own local cluster, in
    a fresh folder (its output in ``demo_output/`` there). Taken by one test file only (tests/test_serve_browser.py),
    so that under ``--dist loadfile`` the demo runs once per session."""
    folder = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "dask_clip.cli", "demo", "--random-weights"]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dask-clip demo failed:\n{result.stdout}\n{result.stderr}"
    return DemoRun(folder, result.stdout)


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster: 2 worker processes with 1 thread each."""
    from dask_clip import get_client

    with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0") as dask_client:
        yield dask_client
        dask_client.cluster.close()


@pytest.fixture
def cli(client, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Runs ``dask-clip ARGS`` in this process (``dask_clip.cli.main``), on the session's cluster unless ARGS name
    where to compute; returns its exit code and what it printed, as ``subprocess.run`` would."""
    from dask_clip.cli import main

    where = {"--cluster-type", "--scheduler-address", "--scheduler-file", "--n-workers"}
    dask_logs = logging.getLogger("distributed")
    level = dask_logs.level

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*args] if where.intersection(args) else [*args, "--scheduler-address", client.scheduler.address]
        capsys.readouterr()
        returncode = main(argv)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(argv, returncode, printed.out, printed.err)

    yield run
    dask_logs.setLevel(level)  # main quiets Dask's logs for the rest of its process

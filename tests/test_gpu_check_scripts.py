"""ci/gpu_wheelhouse.py and ci/gpu_check.py: what goes into the wheelhouse, how packed tasks are counted and how
figures become the table (downloading, installing and the GPU steps run in ci/gpu_rehearsal.sh)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

CI = Path(__file__).resolve().parent.parent / "ci"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, CI / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheelhouse() -> ModuleType:
    return load("gpu_wheelhouse")


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return load("gpu_check")


def test_the_wheelhouse_carries_what_the_machine_lacks_and_leaves_cuda_libraries_to_it(wheelhouse) -> None:
    machine = wheelhouse.machine_packages()
    assert machine["torch"] == "2.11.0" and machine["pandas"] is None and "dask" not in machine
    resolved = [("dask", "2026.7.1"), ("pandas", "3.1.1"), ("nvidia-nvvm", "13.5.37"), ("torchcodec", "0.16.0")]
    chosen = wheelhouse.select(resolved, machine)
    assert [wheel["name"] for wheel in chosen["wheels"]] == ["dask", "torchcodec"]
    assert chosen["on_machine"] == [{"name": "pandas", "version": "any (pip chose 3.1.1)"}]
    assert [entry["name"] for entry in chosen["left_out"]] == ["nvidia-nvvm"]
    with pytest.raises(SystemExit, match=r"faiss-cpu 1\.15\.1 was resolved"):
        wheelhouse.select([("faiss-cpu", "1.15.1")], machine)


def test_a_folder_it_did_not_write_is_refused(wheelhouse, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write"):
        wheelhouse.prepare(tmp_path)
    assert wheelhouse.prepare(tmp_path / "new") == [] and (tmp_path / "new").is_dir()


def test_packed_tasks_are_counted_per_worker(check) -> None:
    def task(key: str, worker: str, start: float, stop: float) -> dict:
        return {"key": key, "worker": worker, "startstops": [{"action": "compute", "start": start, "stop": stop}]}

    stream = [task(f"('read-fused-save-1', {i})", "a", i * 0.1, 5.0) for i in range(4)]
    stream += [task("('read-fused-save-1', 9)", "a", 5.0, 6.0), task("('read-fused-save-1', 8)", "b", 0.0, 1.0)]
    stream.append(task("_run_batch-x", "a", 0.0, 9.0))
    assert check._most_at_once(stream, "save") == {"a": 4, "b": 1}
    # a task whose recorded start falls a millisecond before the previous one's recorded stop
    stream.append(task("('read-fused-save-1', 7)", "a", 4.999, 7.0))
    assert check._most_at_once(stream, "save") == {"a": 5, "b": 1}
    assert check._most_at_once(stream, "save", trim_s=0.005) == {"a": 4, "b": 1}


def test_every_figure_is_a_row_of_the_table(check) -> None:
    results = {"end_to_end": {"status": "ok", "at_224_px": {"images_per_s": 2612.345678}}, "total_s": 301.0}
    table = check.table(results).splitlines()
    assert table[2:] == [
        "| end_to_end | status | ok |",
        "| end_to_end | at_224_px.images_per_s | 2612.35 |",
        "| total_s | | 301 |",
    ]

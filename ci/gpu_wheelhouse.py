#!/usr/bin/env python
"""Download the wheels that the lent GPU machine lacks for the GPU check, into one folder that travels with it.

    python ci/gpu_wheelhouse.py DIR [--also REQUIREMENT ...]     (ci/gpu_wheelhouse.sh runs this)

The machine (one H200, CPython 3.12, x86-64, no package index) has torch 2.11 (CUDA 13) and the packages of
``ci/gpu_machine.txt``. pip resolves ``NEEDED`` for that machine (``pip install --dry-run --report`` with its
platform and Python); every resolved package that the machine lacks is downloaded as a wheel, except CUDA's own
libraries (the machine's CUDA 13 stack is used), and dask_clip itself is built as a wheel. Nothing is installed
here. ``DIR/wheelhouse.json`` lists the wheels, the packages taken from the machine and those left out, each with
its reason; the wheels must stay under ``LIMIT_MIB`` together (one call to the machine carries at most 64 MiB).
DIR must be new, empty or a wheelhouse this script wrote: only the wheels it listed there are replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE = Path(__file__).resolve().parent / "gpu_machine.txt"
MANIFEST = "wheelhouse.json"
LIMIT_MIB = 60
TORCHCODEC = "torchcodec==0.16.*"
"""The first TorchCodec with image decoders (``decode_jpeg``, nvJPEG bundled; no FFmpeg needed for images) and,
per its compatibility table, built for torch >= 2.11 (0.11 matches 2.11 too but has no ``decode_jpeg``)."""
NEEDED = [
    "dask[distributed,dataframe]>=2025.7",  # as pyproject.toml asks
    "dask-cuda[cu13]==26.10.*",  # pinned to RAPIDS 26.10: unpinned, pip backtracks to ancient dask-cuda releases
    TORCHCODEC,
]
TARGET = [
    "--only-binary=:all:",
    "--python-version=3.12",
    "--implementation=cp",
    "--abi=cp312",
    "--abi=abi3",
    "--abi=none",
    *(f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64")),
    *(f"--platform={tag}" for tag in ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64")),
    "--platform=manylinux2010_x86_64",
    "--platform=manylinux1_x86_64",
    "--platform=manylinux_2_5_x86_64",
]
"""pip's options for the machine's interpreter: CPython 3.12 on manylinux x86-64 (glibc 2.28 or older wheels)."""
CUDA_LIBRARIES = re.compile(r"^(nvidia-.*|cuda-(bindings|core|pathfinder|toolkit|python))$")
NEVER = re.compile(r"^(faiss.*|cudf.*|dask-cudf.*|pylibcudf.*|libcudf.*)$")
"""Packages the check must not need: faiss is imported only where it is used, cudf cannot travel in 64 MiB."""


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Jinja2`` -> ``jinja2``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE) -> dict[str, str | None]:
    """The GPU machine's distributions, name -> version where one was read there (else None)."""
    words = " ".join(line for line in path.read_text().splitlines() if not line.startswith("#")).split()
    packages: dict[str, str | None] = {}
    for word in words:
        name, _, version = word.partition("==")
        packages[normalized(name)] = version or None
    return packages


def pip(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gpu_wheelhouse: FAILED: {' '.join(command)}\n{result.stderr.strip()[-3000:]}")
    return result


def resolve(requirements: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every package pip would install for ``requirements`` on the GPU machine."""
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.json"
        options = ["--isolated", "--dry-run", "--ignore-installed", "--quiet", "--target", work]
        pip("install", *options, "--report", str(report), *TARGET, *requirements)
        items = json.loads(report.read_text())["install"]
    return [(normalized(item["metadata"]["name"]), item["metadata"]["version"]) for item in items]


def select(resolved: list[tuple[str, str]], machine: dict[str, str | None]) -> dict[str, list[dict[str, str]]]:
    """Sort the resolved packages into ``wheels`` (to carry), ``on_machine`` and ``left_out`` (with reasons)."""
    chosen: dict[str, list[dict[str, str]]] = {"wheels": [], "on_machine": [], "left_out": []}
    for name, version in resolved:
        if NEVER.match(name):
            sys.exit(f"gpu_wheelhouse: FAILED: {name} {version} was resolved, but the GPU check must not need it")
        if name in machine:
            there = machine[name]
            chosen["on_machine"].append({"name": name, "version": there or f"any (pip chose {version})"})
        elif CUDA_LIBRARIES.match(name):
            reason = "a CUDA library: the machine's own CUDA 13 stack (torch 2.11, cupy-cuda13x) is used"
            chosen["left_out"].append({"name": name, "version": version, "reason": reason})
        else:
            chosen["wheels"].append({"name": name, "version": version})
    return chosen


def prepare(folder: Path) -> list[str]:
    """The wheel files a previous run of this script listed in ``folder``; exits when ``folder`` holds other
    files (nothing this script did not write is ever replaced)."""
    if not folder.exists():
        folder.mkdir(parents=True)
        return []
    manifest = folder / MANIFEST
    if not manifest.exists():
        if any(folder.iterdir()):
            sys.exit(f"gpu_wheelhouse: {folder} holds files this script did not write; give a new or empty folder")
        return []
    return [wheel["file"] for wheel in json.loads(manifest.read_text())["wheels"]]


def download(wheels: list[dict[str, str]], folder: Path, kept: list[str]) -> None:
    """Download each wheel (no dependencies: the list is complete) unless a listed file of it is already there."""
    missing = [f"{w['name']}=={w['version']}" for w in wheels if not _have(folder, w, kept)]
    if missing:
        pip("download", "--quiet", "--no-deps", *TARGET, "--dest", str(folder), *missing)


def _have(folder: Path, wheel: dict[str, str], kept: list[str]) -> bool:
    prefix = f"{wheel['name'].replace('-', '_')}-{wheel['version']}-"
    return any(file.lower().startswith(prefix) and (folder / file).exists() for file in kept)


def build_dask_clip(folder: Path) -> None:
    """dask_clip itself as a wheel (installed there with --no-deps: its faiss dependency is never needed), built
    from a copy of the sources: a build in the checkout would share its build/ folder with the tests that build
    the wheel while CI runs this alongside them."""
    for old in folder.glob("dask_clip-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "source"
        shutil.copytree(ROOT / "dask_clip", source / "dask_clip", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), str(source))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--also", nargs="*", default=[], help="more requirements, e.g. pyarrow==26.* (see --help)")
    options = parser.parse_args(argv)
    folder = options.folder.resolve()
    kept = prepare(folder)
    machine = machine_packages()
    for name in options.also:  # asked for explicitly: carried even when the machine has another version
        machine.pop(normalized(re.split(r"[<>=!~\[; ]", name, maxsplit=1)[0]), None)
    chosen = select(resolve([*NEEDED, *options.also]), machine)
    download(chosen["wheels"], folder, kept)
    files = {path.name.lower(): path.name for path in folder.glob("*.whl")}
    for wheel in chosen["wheels"]:
        prefix = f"{wheel['name'].replace('-', '_')}-{wheel['version']}-"
        wheel["file"] = next(files[lower] for lower in files if lower.startswith(prefix))
    for file in set(kept) - {wheel["file"] for wheel in chosen["wheels"]}:
        (folder / file).unlink(missing_ok=True)  # listed by an earlier run, no longer wanted
    build_dask_clip(folder)
    built = next(folder.glob("dask_clip-*.whl"))
    chosen["wheels"].append({"name": "dask-clip", "version": built.name.split("-")[1], "file": built.name})
    for wheel in chosen["wheels"]:
        wheel["bytes"] = (folder / wheel["file"]).stat().st_size
    total = sum(wheel["bytes"] for wheel in chosen["wheels"])
    manifest = {"requirements": [*NEEDED, *options.also], "total_bytes": total, "limit_mib": LIMIT_MIB, **chosen}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for wheel in sorted(chosen["wheels"], key=lambda w: -w["bytes"]):
        print(f"  {wheel['bytes'] / 2**20:6.2f} MiB  {wheel['file']}")
    for entry in chosen["left_out"]:
        print(f"  left out: {entry['name']} {entry['version']} ({entry['reason']})")
    print(f"  taken from the machine: {', '.join(entry['name'] for entry in chosen['on_machine'])}")
    verdict = "ok" if total < LIMIT_MIB * 2**20 else f"FAILED: over the {LIMIT_MIB} MiB limit"
    print(f"gpu_wheelhouse: {len(chosen['wheels'])} wheels, {total / 2**20:.1f} MiB in {folder}: {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

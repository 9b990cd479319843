#!/usr/bin/env python
"""Check that the GPU extras resolve to one CUDA stack: ``pip install --dry-run --report`` for each extra set,
then fail when a resolved package targets another CUDA major than the one chosen, or when a RAPIDS package
is older than the chosen release (pip silently backtracks to ancient dask-cuda releases when the pins
disagree).

    .venv/bin/python ci/check_gpu_extras.py                 # .[gpu] and .[gpu,test]
    .venv/bin/python ci/check_gpu_extras.py ".[gpu,ucx]"

Needs the package index (PyPI), not a GPU. Prints each set's CUDA-related packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CUDA_MAJOR = 13
RAPIDS_RELEASE = (26, 10)
UCXX_RELEASE = (0, 52)
"""The ucxx release that goes with RAPIDS_RELEASE."""
RAPIDS_NAMES = "cudf|dask-cudf|pylibcudf|rmm|kvikio|dask-cuda|rapids-dask-dependency|raft-dask|cuml"
RAPIDS = re.compile(rf"^(lib)?({RAPIDS_NAMES})(-cu\d+)?$")
UCXX = re.compile(r"^(lib)?(ucxx|distributed-ucxx)(-cu\d+)?$")
CUDA_IN_NAME = re.compile(r"(?:-cu|cuda)(\d{2,3})(?:x|-|$)")
CUDA_VERSIONED = {"cuda-python", "cuda-bindings", "cuda-toolkit"}
"""CUDA's own Python packages, whose major version is the CUDA major they target."""
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
"""The PyTorch that ci/install.sh installs (override with TORCH_PACKAGES, as there)."""
ROOT = Path(__file__).resolve().parent.parent


def resolve(requirement: str) -> list[dict[str, str]] | str:
    """The packages pip would install for ``requirement`` into an empty environment (name and version each),
    or the end of pip's error when it cannot resolve them."""
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.json"
        # --isolated: the package index as a user's machine sees it, not this machine's local wheel folders
        command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet"]
        torch = os.environ.get("TORCH_PACKAGES", " ".join(TORCH)).split()
        command += ["--report", str(report), requirement, *torch]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            return "\n".join(result.stderr.strip().splitlines()[-12:])
        items = json.loads(report.read_text())["install"]
    return [{"name": normalized(item["metadata"]["name"]), "version": item["metadata"]["version"]} for item in items]


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``cuda_bindings`` -> ``cuda-bindings``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_major_of(name: str, version: str) -> int | None:
    """The CUDA major a package targets, from its name (``-cu12``, ``cupy-cuda13x``) or, for CUDA's own Python
    packages, its version; None for packages that do not say."""
    name = normalized(name)
    if name in CUDA_VERSIONED:
        return int(version.split(".")[0])
    match = CUDA_IN_NAME.search(name)
    if match is None:
        return None
    digits = match.group(1)
    return int(digits[:2]) if len(digits) == 3 else int(digits)


def release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def problems(packages: list[dict[str, str]]) -> list[str]:
    found = []
    for package in packages:
        name, version = package["name"], package["version"]
        major = cuda_major_of(name, version)
        if major is not None and major != CUDA_MAJOR:
            found.append(f"{name} {version} targets CUDA {major}, not {CUDA_MAJOR}")
        if RAPIDS.match(name) and release(version) < RAPIDS_RELEASE:
            found.append(f"{name} {version} is older than RAPIDS {RAPIDS_RELEASE[0]}.{RAPIDS_RELEASE[1]:02d}")
        if UCXX.match(name) and release(version) < UCXX_RELEASE:
            found.append(f"{name} {version} is older than ucxx {UCXX_RELEASE[0]}.{UCXX_RELEASE[1]}")
    names = {package["name"] for package in packages}
    if "dask-cuda" not in names:
        found.append("dask-cuda was not resolved at all")
    return found


def main(requirements: list[str]) -> int:
    failed = False
    for requirement in requirements or [".[gpu]", ".[gpu,test]"]:
        packages = resolve(requirement)
        if isinstance(packages, str):
            print(f"{requirement}: FAILED, pip cannot resolve it:\n{packages}")
            failed = True
            continue
        relevant = [p for p in packages if cuda_major_of(p["name"], p["version"]) or RAPIDS.match(p["name"])]
        named = ("torch", "torchcodec", "nvidia-ml-py")
        relevant += [p for p in packages if p["name"] in named or UCXX.match(p["name"])]
        print(f"{requirement}: {len(packages)} packages; CUDA-related:")
        for package in sorted(relevant, key=lambda p: p["name"]):
            print(f"  {package['name']} {package['version']}")
        found = problems(packages)
        for problem in found:
            print(f"  PROBLEM: {problem}")
        failed |= bool(found)
        rapids = f"{RAPIDS_RELEASE[0]}.{RAPIDS_RELEASE[1]:02d}"
        print(f"  {'FAILED' if found else 'ok'}: one CUDA {CUDA_MAJOR} stack, RAPIDS >= {rapids}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The built wheel installs into a fresh environment and its command runs."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what `import dask_clip` and `dask-clip --help` need; torch and transformers load only when a model does
LIGHT_DEPENDENCIES = ["dask[dataframe,distributed]", "pandas", "pyarrow", "numpy", "pillow", "fsspec"]


@pytest.mark.slow
@pytest.mark.network
def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("dask_clip-*.whl"))
    venv.create(tmp_path / "env", with_pip=False)  # this interpreter's pip installs into it: faster than ensurepip
    python = tmp_path / "env" / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    subprocess.run([*pip, *LIGHT_DEPENDENCIES], check=True, capture_output=True)

    version = subprocess.run(
        [python, "-c", "import dask_clip; print(dask_clip.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert version.stdout.strip() == "0.1.0"
    typed = subprocess.run(
        [
            python,
            "-c",
            "import dask_clip, pathlib; print((pathlib.Path(dask_clip.__file__).parent / 'py.typed').exists())",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert typed.stdout.strip() == "True"
    usage = subprocess.run(
        [tmp_path / "env" / "bin" / "dask-clip", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert usage.returncode == 0 and "embed" in usage.stdout and "demo" in usage.stdout

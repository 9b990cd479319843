"""The package's import surface: lazy, and free of torch, faiss and GPU libraries until used."""

from __future__ import annotations

import subprocess
import sys

import dask_clip


def test_import_pulls_in_neither_torch_nor_faiss_nor_gpu_libraries() -> None:
    code = (
        "import sys, dask_clip\n"
        "from dask_clip import ImageTextPairDataset, ClipImageEmbedder, SemanticDeduplicator, get_client\n"
        "heavy = ('torch', 'faiss', 'cudf', 'dask_cudf', 'dask_cuda', 'transformers')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names() -> None:
    for name in ("get_client", "ImageTextPairDataset", "ClipImageEmbedder", "cache_info", "clear_cache"):
        assert callable(getattr(dask_clip, name))
    assert dask_clip.__version__

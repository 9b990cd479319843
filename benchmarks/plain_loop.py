"""Images per second of the loop a user would write without dask_clip: ``CLIPImageProcessor`` +
``CLIPModel.get_image_features`` over every image of the tars, read with ``tarfile``, in one process, fp32,
batched like dask_clip (torch's default threads)."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import harness


def plain_loop(tars: list[Path], model_dir: Path, batch_size: int) -> dict[str, Any]:
    """``CLIPImageProcessor`` + ``CLIPModel.get_image_features`` over every image, one process, fp32."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    embeddings = []

    def flush(images: list[Any]) -> None:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        embeddings.append(torch.nn.functional.normalize(features, dim=-1).numpy())

    started = time.perf_counter()
    for tar in tars:
        with tarfile.open(tar) as archive:
            batch = []
            for member in archive:
                if member.name.endswith(".jpg"):
                    batch.append(Image.open(io.BytesIO(archive.extractfile(member).read())))
                    if len(batch) == batch_size:
                        flush(batch)
                        batch = []
            if batch:
                flush(batch)
    seconds = time.perf_counter() - started
    return {**harness.rate(sum(len(e) for e in embeddings), seconds), "torch_threads": torch.get_num_threads()}

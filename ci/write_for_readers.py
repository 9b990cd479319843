#!/usr/bin/env python
"""Write the folders that ``ci/readers.sh`` reads back: every way dask_clip writes a vector column, with null rows.

    python ci/write_for_readers.py FOLDER

Makes img2dataset-like shards (one failed download per shard, so a null image embedding per shard), embeds
images and captions with a random-weight CLIP, and writes, each into its own sub-folder of ``FOLDER``:

- ``saved``: ``save_metadata`` in place, the default layout (``list<float32>``);
- ``resharded``: ``to_webdataset`` of that dataset into new shards;
- ``float16`` and ``fixed_size_list``: ``save_metadata(path, vector_layout=...)``.

Each sub-folder gets a file ``expect`` holding the ``--expect COLUMN:NULLS:WIDTH`` arguments of ``ci/read_back.py``
for what dask_clip itself holds in memory, so a reader passes only when it sees the same nulls and widths.
Runs on dask's threaded scheduler: no cluster needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dask

from dask_clip import ClipImageEmbedder, ClipTextEmbedder, ImageTextPairDataset, testing

COLUMNS = ("image_embedding", "text_embedding")


def expectations(dataset: ImageTextPairDataset) -> str:
    """``--expect`` arguments for each vector column of ``dataset``: its nulls and width, as dask_clip reads them."""
    frame = dataset.metadata.compute()
    return " ".join(f"--expect {c}:{int(frame[c].isna().sum())}:{dataset.embedding_width(c)}" for c in COLUMNS)


def main(folder: Path) -> None:
    model = testing.save_tokenizer_for_clip_model(testing.save_random_clip_model(folder / "model", shape="tiny"))
    shards = folder / "saved"
    testing.make_img2dataset_shards(shards, shard_numbers=(0, 1, 2), samples_per_shard=8, failed_per_shard=2)
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    dataset = ClipTextEmbedder(str(model))(ClipImageEmbedder(str(model), autocast=False)(dataset))
    dataset.save_metadata()

    saved = ImageTextPairDataset.from_webdataset(str(shards))
    saved.to_webdataset(str(folder / "resharded"), samples_per_shard=10)
    for layout in ("float16", "fixed_size_list"):
        saved.save_metadata(str(folder / layout), vector_layout=layout)
    for name in ("saved", "resharded", "float16", "fixed_size_list"):
        has_tars = name in ("saved", "resharded")
        written = ImageTextPairDataset.from_webdataset(str(folder / name)) if has_tars else saved
        (folder / name / "expect").write_text(expectations(written) + "\n")
        print(f"{folder / name}: {(folder / name / 'expect').read_text().strip()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with dask.config.set(scheduler="threads"):
        main(Path(sys.argv[1]))

"""Every operation in a plain script: no Dask client, no ``if __name__ == "__main__":`` guard.

Without a client dask_clip computes on threads of the script's own process. A process pool would
re-import the script in each child: its top-level code would run again, or the run would break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from dask_clip import testing

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    print("top-level code ran", flush=True)

    import dask_clip as dc

    shards, model, aesthetic, work = sys.argv[1:5]
    dataset = dc.ImageTextPairDataset.from_webdataset(shards)
    embedded = dc.ClipImageEmbedder(model, autocast=False, batch_size=4)(dataset)
    embedded = dc.ClipTextEmbedder(model, batch_size=4)(embedded)
    print("saved", int(embedded.save_metadata()["written"].sum()))
    print("resumed", int((~embedded.save_metadata()["written"]).sum()))

    dataset = dc.ImageTextPairDataset.from_webdataset(shards)
    curated = dc.ExactDeduplicator()(dataset)
    curated = dc.SemanticDeduplicator(n_clusters=2, keep_column="semantic_keep")(curated)
    curated = dc.AestheticClassifier(aesthetic, embedding_dim=32)(curated)
    curated = dc.clip_score(curated)
    curated = dc.keep_by_threshold(curated, "clip_score", min=-1.0)
    print("curated", int(curated.save_metadata(work + "/curated")["rows"].sum()))

    dataset = dc.ImageTextPairDataset.from_webdataset(shards)
    print("hits", len(dataset.search(text="a photo of a cat", k=3)))
    print("exported", int(dataset.export_clip_retrieval(work + "/export")["rows"].sum()))
    print("resharded", int(dataset.to_webdataset(work + "/resharded", samples_per_shard=5)["rows"].sum()))
    """
)


def test_every_operation_runs_in_a_script_without_client_or_main_guard(
    pristine_shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import torch

    from dask_clip.models.classifiers import AestheticMlp

    shards = shutil.copytree(pristine_shards, tmp_path / "shards")
    model = shutil.copytree(tiny_model, tmp_path / "model")
    testing.save_tokenizer_for_clip_model(model)
    aesthetic = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(32).state_dict(), aesthetic)
    script = tmp_path / "curate.py"
    script.write_text(SCRIPT)

    result = subprocess.run(
        [sys.executable, str(script), str(shards), str(model), str(aesthetic), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("top-level code ran") == 1, result.stdout
    assert lines[1:] == ["saved 3", "resumed 3", "curated 18", "hits 3", "exported 15", "resharded 18"]

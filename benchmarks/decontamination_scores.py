"""Decontamination scores on planted copies: which threshold finds re-encoded and resized copies of evaluation
photos, and what it flags among distinct photos.

``testing.make_contamination_case`` writes an evaluation folder of photos and training shards holding copies of
them (re-encoded, resized, centre crops) and distinct photos (the same edits of photos not in the folder). The
shards are embedded (``ClipImageEmbedder``) and decontaminated with threshold -1, so that every row records its
best cosine to the evaluation folder; this prints each kind's score distribution, then for each candidate
threshold the recall on re-encoded + resized copies, on crops (apart) and the false-positive rate on distinct
photos.

    python benchmarks/decontamination_scores.py                       # the random-weight tiny CLIP of the tests
    python benchmarks/decontamination_scores.py --model-dir /path/to/clip   # a real one
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, decontaminate, get_client, testing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="a CLIP model (default: the tests' random tiny one)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.995, 0.997, 0.998, 0.999])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, get_client("cpu", n_workers=2, threads_per_worker=1):
        work = Path(work)
        model_dir = args.model_dir or str(testing.save_random_clip_model(work / "model", shape="tiny"))
        planted = pd.DataFrame(testing.make_contamination_case(work))
        ClipImageEmbedder(model_dir, autocast=False)(
            ImageTextPairDataset.from_webdataset(str(work / "shards"))
        ).save_metadata()
        dataset = ImageTextPairDataset.from_webdataset(str(work / "shards"))
        scored = decontaminate(dataset, work / "eval", threshold=-1.0).metadata.compute()
    rows = planted.merge(scored[["key", "contamination_similarity", "contamination_match"]], on="key")
    rows["score"] = rows["contamination_similarity"].astype("float64")
    rows["group"] = np.where(rows["copy"], rows["kind"], "distinct")
    rows.loc[rows["copy"] & rows["kind"].isin(["reencoded", "resized"]), "group"] = rows["kind"]
    print(f"model: {args.model_dir or 'random-weight tiny CLIP (seed 0)'}; {len(rows)} training rows")
    print(rows.groupby("group")["score"].describe(percentiles=[0.01, 0.5, 0.99]).to_string(float_format="%.5f"))
    copies = rows[rows["copy"] & rows["kind"].isin(["reencoded", "resized"])]
    crops = rows[rows["copy"] & (rows["kind"] == "crop")]
    distinct = rows[~rows["copy"]]
    closest = distinct.groupby("photo")["score"].max().sort_values(ascending=False)
    print("distinct photos' highest score:", closest.round(5).to_dict())
    right = (copies["contamination_match"] == copies["photo"] + ".jpg").mean()
    print(f"copies whose best match is their own photo: {right:.3f} of {len(copies)}")
    print("threshold  recall(re-encoded+resized)  recall(crops)  false-positive rate(distinct)")
    for threshold in args.thresholds:
        print(
            f"{threshold:<9}  {(copies['score'] >= threshold).mean():.3f} of {len(copies):<14}  "
            f"{(crops['score'] >= threshold).mean():.3f} of {len(crops):<4}  "
            f"{(distinct['score'] >= threshold).mean():.3f} of {len(distinct)}"
        )


if __name__ == "__main__":
    main()

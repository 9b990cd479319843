#!/usr/bin/env python
"""dask_clip against clip-retrieval, end to end on the same photos and the same random-weight CLIP.

clip-retrieval cannot share an environment with dask_clip (it pins numpy 1.26, pandas < 2.4 and pyarrow 15, below
dask_clip's floor of 16), so it runs in its own virtual environment, by default ``benchmarks/.venv-clip-retrieval``
(gitignored). Make it once with a pyenv Python 3.11 and no download of CUDA libraries::

    ~/.pyenv/versions/3.11.7/bin/python -m venv benchmarks/.venv-clip-retrieval
    benchmarks/.venv-clip-retrieval/bin/pip install clip-retrieval==2.45.0 "setuptools<81"  # clip needs pkg_resources
    benchmarks/.venv-clip-retrieval/bin/pip install --no-deps torch==2.14.1 torchvision==0.29.1  # dask_clip's torch
    ln -s $PWD/.venv/lib/python3.11/site-packages/nvidia benchmarks/.venv-clip-retrieval/lib/python3.11/site-packages/

(the CUDA build of torch loads its CUDA libraries at import; the link lends it those of dask_clip's environment
rather than downloading 3 GB more. The CPU wheel torch 2.13.0+cpu installs too, but no torchvision on the index
loads beside it.) Then, from the root of a checkout::

    .venv/bin/python benchmarks/bench_clip_retrieval.py   # 3 rounds, 192 photos in 4 shards (~15 min, 2 cores)

Both tools read the same img2dataset-layout WebDataset shards of real photos at their original sizes
(``harness.make_shards``) and embed them with the same random-weight ViT-B/32-shaped CLIP
(``testing.save_random_clip_model``, saved as transformers 4 wrote it so clip-retrieval's transformers 4.57 loads
it; it gets its model through its ``hf_clip:<folder>`` prefix, ``CLIPModel.from_pretrained`` on the folder, and
preprocesses with that folder's ``CLIPImageProcessor``). Each tool is loaded once and warmed up before the timed
rounds, and every timed run is end to end from the shards to files on disk:

- clip-retrieval: ``clip_inference(input_format="webdataset", enable_text=False, batch_size, num_prepro_workers)``
  writing ``img_emb/*.npy`` + ``metadata/*.parquet``, in one long-lived process of its environment
  (``clip_retrieval_runs.py``; the model stays loaded between runs, as ``all_clip.load_clip`` caches it). On a
  CPU it runs the model in fp32 (its ``hf_clip`` wrapper autocasts on GPUs only);
- dask_clip: ``from_webdataset`` -> ``ClipImageEmbedder`` -> ``save_metadata`` on ``get_client("cpu")`` (a
  ``LocalCluster`` over the same cores), for each engine: torch fp32 (``autocast=False``, so exact decoding),
  torch bf16 (autocast, fast decoding), OpenVINO fp32 and bf16.

Rounds alternate the order of the tools (clip-retrieval first, then last, ...) so both see the same load; each
round's ratio is clip-retrieval's seconds over dask_clip's, and the median over rounds is reported. After the
rounds, the outputs are checked: the same number of embeddings, and the cosine of each row to clip-retrieval's row
of the same key (clip-retrieval stores float16: cosines are good to about 1e-4). Results are printed and written as
JSON to ``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import numpy as np

HERE = Path(__file__).resolve().parent
ENGINES = {  # name -> ClipImageEmbedder options
    "torch fp32": {"autocast": False},
    "torch bf16": {"autocast": True},
    "openvino fp32": {"autocast": False, "engine": "openvino"},
    "openvino bf16": {"autocast": True, "engine": "openvino"},
}
BASELINE = "clip-retrieval"
PROBE = "clip-retrieval, small run"  # the same call on a few photos: its per-call start-up cost


def paired_ratios(baseline: list[float], seconds: list[float]) -> dict[str, Any]:
    """Each round's speed-up over the baseline run of the same round (its seconds over ours), and their median."""
    if len(seconds) != len(baseline):
        raise ValueError(f"{len(seconds)} rounds against {len(baseline)} of the baseline; ratios pair rounds")
    ratios = [b / s for b, s in zip(baseline, seconds, strict=True)]
    return {"ratios": ratios, "median": statistics.median(ratios)}


def without_start_up(full: list[float], probe: list[float], images: int, probe_images: int) -> list[float]:
    """Seconds ``images`` would take at the marginal rate: ``full`` runs of ``images`` less ``probe`` runs of
    ``probe_images`` in the same rounds (a per-call start-up cost cancels), scaled back to ``images``."""
    if probe_images >= images:
        raise ValueError(f"the probe ({probe_images} images) must be smaller than the run ({images})")
    return [(f - p) * images / (images - probe_images) for f, p in zip(full, probe, strict=True)]


def round_order(round_number: int, names: list[str]) -> list[str]:
    """The order of the runs in a round: ``names`` as given in even rounds, reversed in odd ones."""
    return list(names) if round_number % 2 == 0 else list(reversed(names))


# --------------------------------------------------------------------------------------------------
# clip-retrieval, in its own environment


class ClipRetrieval:
    """A long-lived ``clip_retrieval_runs.py`` process under the clip-retrieval environment's Python."""

    def __init__(self, venv: Path, log_path: Path) -> None:
        python = venv / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"{python}: no clip-retrieval environment; make it as this script's docstring says")
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close(); its output is long (warnings, progress)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [str(python), str(HERE / "clip_retrieval_runs.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.versions = json.loads(
            subprocess.run(
                [str(python), "-c", _VERSIONS], capture_output=True, text=True, check=True, env=env
            ).stdout.strip()
        )

    def run(self, **request: Any) -> float:
        """``clip_inference(**request)`` in that process; its wall-clock seconds."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            self.log.write(line)
            if "RESULT " in line:
                answer = json.loads(line.split("RESULT ", 1)[1])
                if "error" in answer:
                    raise RuntimeError(f"clip-retrieval failed:\n{answer['error']}")
                return float(answer["seconds"])
        raise RuntimeError(f"clip-retrieval exited with {self.process.wait()}; see {self.log.name}")

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


_VERSIONS = (
    "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
    "('clip-retrieval', 'torch', 'torchvision', 'transformers', 'numpy', 'pyarrow', 'pillow', 'webdataset')}))"
)


def brace_pattern(tars: list[Path]) -> str:
    """``tars`` (in one folder) as the brace pattern clip-retrieval expects: ``folder/{00000,00001}.tar``."""
    folders = {t.parent for t in tars}
    if len(folders) != 1:
        raise ValueError(f"shards in {len(folders)} folders; clip-retrieval's pattern names one")
    if len(tars) == 1:
        return str(tars[0])
    return f"{tars[0].parent}/{{{','.join(t.stem for t in tars)}}}.tar"


def clip_retrieval_request(tars: list[Path], output: Path, model_dir: Path, options: argparse.Namespace) -> dict:
    return {
        "input_dataset": brace_pattern(tars),
        "output_folder": str(output),
        "input_format": "webdataset",
        "batch_size": options.batch_size,
        "num_prepro_workers": options.prepro_workers,
        "enable_text": False,
        "enable_metadata": False,
        "clip_model": f"hf_clip:{model_dir}",
    }


def read_clip_retrieval(output: Path) -> dict[str, np.ndarray]:
    """key -> embedding (float32) from clip-retrieval's ``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}``."""
    import pandas as pd

    out = {}
    for npy in sorted((output / "img_emb").glob("img_emb_*.npy")):
        number = npy.stem.rsplit("_", 1)[1]
        keys = pd.read_parquet(output / "metadata" / f"metadata_{number}.parquet")["image_path"]
        out.update(zip(keys, np.load(npy).astype(np.float32), strict=True))
    return out


def read_dask_clip(output: Path) -> dict[str, np.ndarray]:
    """key -> embedding from ``save_metadata``'s parquets (rows with an embedding)."""
    import pandas as pd

    frame = pd.concat([pd.read_parquet(p) for p in sorted(output.glob("*.parquet"))])
    frame = frame[frame["image_embedding"].notna()]
    return {
        key: np.asarray(vector, dtype=np.float32)
        for key, vector in zip(frame["key"], frame["image_embedding"], strict=True)
    }


def agreement(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Row counts, keys in one but not the other, and the cosines of rows joined by key."""
    common = sorted(set(reference) & set(other))
    a = np.stack([reference[k] for k in common])
    b = np.stack([other[k] for k in common])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {
        "rows_reference": len(reference),
        "rows": len(other),
        "only_in_reference": len(set(reference) - set(other)),
        "only_here": len(set(other) - set(reference)),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }


# --------------------------------------------------------------------------------------------------


def measure(folder: Path, options: argparse.Namespace, started: float) -> dict[str, Any]:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, clear_cache, get_client, testing

    model_dir = testing.save_random_clip_model(folder / "model", shape=options.shape)
    testing.save_tokenizer_for_clip_model(model_dir)  # clip-retrieval loads a CLIPProcessor (tokenizer included)
    testing.write_transformers4_clip_config(model_dir)  # clip-retrieval's transformers is 4.x
    tars = harness.make_shards(folder / "shards", options.shards, options.per_shard)
    warm_tars = harness.make_shards(folder / "warm", options.prepro_workers, 4)  # webdataset: a shard per worker
    images = sum(map(harness.count_images, tars))
    out: dict[str, Any] = {"images": images, "shards": len(tars), "image_sizes": harness.image_sizes(tars)}
    harness.log(started, f"{images} photos in {len(tars)} shards; starting clip-retrieval and the cluster")

    clip_retrieval = ClipRetrieval(options.venv, folder / "clip-retrieval.log")
    client = get_client("cpu", dashboard_address=":0")
    try:
        out["clip_retrieval_versions"] = clip_retrieval.versions
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        out["cluster"] = {"workers": len(workers), "threads": sum(w["nthreads"] for w in workers)}
        t0 = time.perf_counter()
        clip_retrieval.run(**clip_retrieval_request(warm_tars, folder / "cr-warm", model_dir, options))
        out["clip_retrieval_first_run_s"] = time.perf_counter() - t0  # start-up, model load and warm-up included
        cache = str(folder / "openvino-cache")
        embedders = {
            name: ClipImageEmbedder(str(model_dir), batch_size=options.batch_size, engine_cache_dir=cache, **kwargs)
            for name, kwargs in ENGINES.items()
            if name in options.engines
        }
        out["first_run_s"] = {}
        for name, embedder in embedders.items():  # loads (and converts) once per worker, untimed in the rounds
            t0 = time.perf_counter()
            embedder(ImageTextPairDataset.from_webdataset(str(warm_tars[0].parent))).save_metadata(
                path=str(folder / f"warm-{name.replace(' ', '-')}")
            )
            out["first_run_s"][name] = time.perf_counter() - t0
        harness.log(started, f"warm: {json.dumps(out['first_run_s'])}")

        def run(name: str, output: Path) -> float:
            if name in (BASELINE, PROBE):
                shards = tars if name == BASELINE else warm_tars
                return clip_retrieval.run(**clip_retrieval_request(shards, output, model_dir, options))
            t0 = time.perf_counter()
            embedders[name](ImageTextPairDataset.from_webdataset(str(tars[0].parent))).save_metadata(path=str(output))
            return time.perf_counter() - t0

        names = [BASELINE, PROBE, *embedders]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        out["load_average_per_round"] = []
        for number in range(options.rounds):
            for name in round_order(number, names):
                output = folder / f"out-{number}-{name.replace(' ', '-')}"
                seconds[name].append(run(name, output))
                if number < options.rounds - 1:
                    shutil.rmtree(output)
            out["load_average_per_round"].append(os.getloadavg())
            harness.log(started, f"round {number}: " + ", ".join(f"{n} {s[-1]:.1f}s" for n, s in seconds.items()))
        clear_cache(client)
    finally:
        clip_retrieval.close()
        client.close()
        client.cluster.close()

    last = options.rounds - 1
    reference = read_clip_retrieval(folder / f"out-{last}-{BASELINE}")
    out["seconds"] = seconds
    out["images_per_s"] = {name: [images / s for s in runs] for name, runs in seconds.items()}
    out["speedup"] = {name: paired_ratios(seconds[BASELINE], seconds[name]) for name in embedders}
    out["probe_images"] = probe_images = sum(map(harness.count_images, warm_tars))
    steady = without_start_up(seconds[BASELINE], seconds[PROBE], images, probe_images)
    out["clip_retrieval_without_start_up_s"] = steady
    out["speedup_without_clip_retrieval_start_up"] = {name: paired_ratios(steady, seconds[name]) for name in embedders}
    out["agreement"] = {
        name: agreement(reference, read_dask_clip(folder / f"out-{last}-{name.replace(' ', '-')}"))
        for name in embedders
    }
    return out


def print_report(results: dict[str, Any]) -> None:
    m, r = results["machine"], results["result"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, amx={m['amx']}; dask_clip: torch "
        f"{m['torch']}, transformers {m['transformers']}, openvino {results['openvino']}; clip-retrieval: "
        f"{json.dumps(r['clip_retrieval_versions'])}; load average at start {m['load_average_start'][0]:.1f}, "
        f"per round {[round(x[0], 1) for x in r['load_average_per_round']]}"
    )
    print(
        f"{r['images']} photos in {r['shards']} shards (short side {r['image_sizes'][0]}-, long side up to "
        f"{r['image_sizes'][1]} px); batch {results['options']['batch_size']}; dask_clip cluster "
        f"{r['cluster']['workers']} workers, {r['cluster']['threads']} threads; clip-retrieval "
        f"{results['options']['prepro_workers']} preprocessing workers"
    )
    steady = [r["images"] / s for s in r["clip_retrieval_without_start_up_s"]]
    rows = [
        [BASELINE, " / ".join(f"{x:.2f}" for x in r["images_per_s"][BASELINE]), "1x", "1x", "-", "-", "-"],
        [f"{BASELINE} without start-up", " / ".join(f"{x:.2f}" for x in steady), "-", "-", "1x", "-", "-"],
    ]
    for name, speed in r["speedup"].items():
        a, marginal = r["agreement"][name], r["speedup_without_clip_retrieval_start_up"][name]
        rows.append(
            [
                name,
                " / ".join(f"{x:.2f}" for x in r["images_per_s"][name]),
                " / ".join(f"{x:.2f}x" for x in speed["ratios"]),
                f"{speed['median']:.2f}x",
                f"{marginal['median']:.2f}x",
                f"{a['rows']} vs {a['rows_reference']} ({a['only_here']}/{a['only_in_reference']} unmatched)",
                f"{a['cosine_min']:.5f} / {a['cosine_mean']:.5f}",
            ]
        )
    header = (
        "tool",
        "img/s per round",
        "speed-up per round",
        "median",
        "median, without its start-up",
        "embeddings",
        "cosine min / mean",
    )
    harness.print_table(header, rows)
    print(
        f"\nfirst runs (start-up, load, conversion): clip-retrieval {r['clip_retrieval_first_run_s']:.1f}s; "
        + ", ".join(f"{n} {s:.1f}s" for n, s in r["first_run_s"].items())
    )
    probe = r["seconds"][PROBE]
    print(
        f"clip-retrieval's per-call start-up: {r['probe_images']} photos took "
        + " / ".join(f"{x:.1f}" for x in probe)
        + "s (two spawned logger processes import torch each call); the 'without its start-up' column takes it off"
    )
    print(f"load average at end {results['load_average_end'][0]:.1f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=HERE / ".venv-clip-retrieval", help="clip-retrieval's venv")
    parser.add_argument("--shape", default="vit-b-32", help="testing.save_random_clip_model shape")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prepro-workers", type=int, default=harness.CORES, help="clip-retrieval num_prepro_workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES), help="dask_clip engines, comma-separated")
    parser.add_argument("--work-dir", default=None, help="parent of the temporary folder")
    options = parser.parse_args(argv)
    options.engines = options.engines.split(",")
    unknown = set(options.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    return options


def main(argv: list[str]) -> dict[str, Any]:
    import openvino

    options = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": harness.machine(), "openvino": openvino.get_version(), "options": {}}
    results["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}
    with harness.work_folder("bench-clip-retrieval-", options.work_dir) as folder:
        results["result"] = measure(folder, options, started)
    results["load_average_end"] = os.getloadavg()
    harness.finish("bench_clip_retrieval", results, started, print_report)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

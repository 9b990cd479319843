#!/usr/bin/env python
"""The table ``ci/gpu_check.sh`` ends with: the gpu-marked tests' outcome and the newest device-mode benchmark
results in ``benchmarks/results/`` (decode and end-to-end images per second, nvJPEG vs Pillow agreement, peak
GPU memory).

    .venv/bin/python ci/gpu_report.py gpu-tests.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def newest(prefix: str) -> dict[str, Any] | None:
    """The newest ``benchmarks/results/<prefix>-*.json``, or None."""
    found = sorted(RESULTS.glob(f"{prefix}-*.json"))
    return json.loads(found[-1].read_text()) if found else None


def test_outcome(junit_xml: Path) -> str:
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"


def rows(junit_xml: Path) -> list[tuple[str, str]]:
    table = [("gpu-marked tests", test_outcome(junit_xml))]
    decode = newest("bench_decode-cuda")
    if decode:
        table.append(("GPU", decode["device_name"]))
        for size, modes in decode["sizes"].items():
            for mode in ("exact", "fast", "device"):
                table.append((f"decode {mode}, long side {size}", f"{modes[mode]['images_per_s']:.1f} images/s"))
            table.append(
                (
                    f"nvJPEG vs Pillow, long side {size}",
                    f"mean |crop - exact| {modes['device']['mean_abs_vs_exact']:.3f}",
                )
            )
        table.append(("peak GPU memory, decode", f"{decode['peak_gpu_memory_mb']:.0f} MiB"))
    embed = newest("bench_embed")
    for shape, entry in (embed or {}).get("shapes", {}).items():
        table.append((f"end to end, {shape}", f"{entry['end_to_end']['images_per_s']:.1f} images/s"))
        table.append((f"model only, {shape}", f"{entry['model_only']['images_per_s']:.1f} images/s"))
        peaks = [f"{peak:.0f}" for peak in entry.get("peak_gpu_memory_mb_per_worker", []) if peak is not None]
        table.append((f"peak GPU memory per worker, {shape}", f"{', '.join(peaks) or 'n/a'} MiB"))
    return table


def main(argv: list[str]) -> int:
    table = rows(Path(argv[0]))
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

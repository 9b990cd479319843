"""Runs of ``clip_retrieval.clip_inference`` on request, for ``bench_clip_retrieval.py``, in clip-retrieval's own
virtual environment (it cannot share one with dask_clip: it pins numpy 1.26, pandas < 2.4 and pyarrow 15).

Standard library and clip-retrieval only: this runs under that environment's Python. It reads one JSON request a
line on stdin (``clip_inference``'s keyword arguments) and answers each with one JSON line on stdout prefixed
``RESULT`` (the wall-clock seconds of the call, or the error). The process stays up between requests, so the
model is loaded once (``all_clip.load_clip`` caches it per process), as dask_clip's workers keep theirs: the
timed runs compare steady-state work, start-up apart.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main() -> None:
    from clip_retrieval.clip_inference.main import main as clip_inference

    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            clip_inference(**request)
            answer = {"seconds": time.perf_counter() - started}
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it with the traceback
            answer = {"error": traceback.format_exc()}
        print("RESULT " + json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()

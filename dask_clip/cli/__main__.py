"""``python -m dask_clip.cli``: the ``dask-clip`` command."""

import sys

from dask_clip.cli import main

sys.exit(main())

"""The GPU tests' figures: each record printed as a ``FIGURES`` line and appended as a JSON line to
``$PACKVIT_GPU_REPORT`` when it is set (``scripts/gpu_check.sh`` collects them into its summary)."""

import json
import os


def report(record: dict) -> None:
    print("FIGURES", json.dumps(record))
    path = os.environ.get("PACKVIT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

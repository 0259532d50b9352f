"""Functions the Ray tests run as tasks (importable by the cluster's workers: the tests put this folder on
their PYTHONPATH). Not a test module."""

import json
import os
import time
from pathlib import Path


def record_gpu(name: str, seconds: float, overrides: dict | None = None) -> dict:
    """Hold the task's GPU for ``seconds`` and report which one it was, when, and the device it was given."""
    start = time.time()
    time.sleep(seconds)
    return {"name": name, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time(),
            "device": (overrides or {}).get("device"), "pid": os.getpid()}


def write_or_fail(method: str, category: str, seed: int, out_dir: str | Path, fail: bool = False,
                  log: str | None = None, existing: str = "overwrite") -> dict:
    """A run that writes metrics.json into ``out_dir`` like vadlab.evaluate.run, or raises when ``fail``.

    ``log``: a file on this machine to which every call appends its category and seed."""
    if log:
        with open(log, "a") as fh:
            fh.write(f"{category} {seed}\n")
    if fail:
        raise ValueError(f"{category} seed {seed}: this run was told to fail")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"method": method, "category": category, "seed": seed, "image_auroc": 0.5 + seed / 10}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics

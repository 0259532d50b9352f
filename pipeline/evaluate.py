# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage `evaluate`: fit one method on each category and score its test split
#
# `dvc repro` runs this notebook once per run of `run_methods` with papermill (`-f params.yaml -p method M`).
# For every category of `data` it fits a fresh model on the defect-free `train/good` images only, predicts
# the test split, and writes `metrics.json`, `predictions.npz` and `overlays/` under
# `results/<dataset>/<run>/<category>/` (see `vadlab.evaluate.run`), plus all categories' metrics in
# `results/<dataset>/metrics/<run>.json` (a DVC metric).
#
# The categories are independent, so `jobs` of them run at once in `jobs` worker processes (the torch
# threads are split between them; a worker's peak memory is the largest of its runs of this method); each
# run seeds itself, so the numbers do not depend on `jobs` beyond floating-point rounding.

# %% tags=["parameters"]
method = "padim"
seed = 0
jobs = 1
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
methods = {"padim": {"image_size": 256, "preset": "paper", "set": {}}}
results_root = "results"

# %%
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from vadlab.evaluate import run
from vadlab.methods import preset_overrides


def run_all(fn, calls: list[dict], jobs: int) -> list:
    """``fn(**kwargs)`` for every kwargs in ``calls``, ``jobs`` at a time in worker processes (1: in this one)."""
    n = max(1, min(int(jobs), len(calls)))
    if n == 1:
        return [fn(**kwargs) for kwargs in calls]
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)) // n)
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    try:  # spawned children read the environment at start-up
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fn, **kwargs) for kwargs in calls]
            return [f.result() for f in futures]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if method not in methods:
    raise KeyError(f"params.yaml has no settings for run {method!r} under `methods:`")
settings = methods[method]
implementation = settings.get("method", method)  # a run name may select a variant, e.g. dmad_plus -> dmad
overrides = {**preset_overrides(implementation, settings.get("preset", "paper")), **(settings.get("set") or {})}
image_size = int(settings["image_size"])
out_root = Path(results_root) / data["name"]
print(f"{method} ({implementation}) on {data['name']} {data['categories']} at {image_size} px, {jobs} jobs, "
      f"overrides {overrides}")

# %%
start = time.perf_counter()
calls = [dict(method=implementation, data=data["root"], category=category, image_size=image_size,
              overrides=overrides, out_dir=out_root / method / category, seed=int(seed))
         for category in data["categories"]]
results = dict(zip(data["categories"], run_all(run, calls, jobs)))
wall = time.perf_counter() - start
print(f"{len(results)} categories in {wall:.0f} s")

# %%
KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max", "fit_seconds",
        "predict_seconds_per_image", "peak_memory_mb", "n_parameters")
table = pd.DataFrame({c: {k: m[k] for k in KEYS} for c, m in results.items()}).T
table.loc["mean"] = table.mean()
metrics = {"run": method, "method": implementation, "image_size": image_size, "stage_seconds": round(wall, 1),
           **{c: {k: round(float(v), 6) for k, v in row.items()} for c, row in table.iterrows()}}
(out_root / "metrics").mkdir(parents=True, exist_ok=True)
(out_root / "metrics" / f"{method}.json").write_text(json.dumps(metrics, indent=2) + "\n")
for category in data["categories"]:
    assert (out_root / method / category / "metrics.json").is_file()
table

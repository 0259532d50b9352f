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
# # Stage `elpv_evaluate`: one method on the real ELPV solar cells (mono, poly), plus the graded set
#
# `dvc repro` runs this notebook once per run of `run_methods` (`-f params.yaml -p method M`), with the
# run's settings from `methods:` (the same preset and image size as on the generated data). For each
# category of `elpv` and each seed it fits a fresh model on `train/good` (p = 0 cells), scores `test/`
# (the other p = 0 cells and every p = 1 cell; image labels only, so the pixel metrics are null with a
# stated reason), then scores the graded cells (p = 1/3, 2/3) with the same model
# (`vadlab.evaluate_graded.run_graded`). Writes `results/elpv/<run>/<category>/seed<k>/` (`metrics.json`,
# `predictions.npz`, `graded.csv`, `overlays/`) and `results/elpv/metrics/<run>.json` (a DVC metric: quality only; the costs go to
# `results/elpv/<run>/costs.json`).

# %% tags=["parameters"]
method = "padim"
seed = 0
jobs = 1
executor = "local"  # or ray (params.yaml `executor`, `ray_address`), as for the generated data
ray_address = None
feature_cache = None  # folder of the frozen-backbone feature cache (params.yaml `feature_cache`), None: off
elpv = {"root": "build/elpv", "seed": 0, "train_fraction": 0.8, "max_train": 200, "n_seeds": 1,
        "categories": ["mono", "poly"]}
methods = {"padim": {"image_size": 128, "preset": "paper", "set": {}}}
results_root = "results"

# %%
import math
import os
import time
from pathlib import Path

import pandas as pd

from vadlab.evaluate import run_parallel, write_json
from vadlab.evaluate_graded import run_graded
from vadlab.methods import run_settings

if feature_cache:  # every worker process started below inherits it (vadlab.backbones.FeatureCache)
    os.environ["VADLAB_FEATURE_CACHE"] = str(Path(feature_cache).resolve())

implementation, overrides, image_size = run_settings(method, methods)
seeds = [int(seed) + k for k in range(int(elpv["n_seeds"]))]
out_root = Path(results_root) / "elpv"
print(f"{method} ({implementation}) on ELPV {elpv['categories']} at {image_size} px, seeds {seeds}, {jobs} jobs")

# %%
start = time.perf_counter()
keys = [(category, s) for s in seeds for category in elpv["categories"]]
calls = [dict(method=implementation, data=elpv["root"], category=category, image_size=image_size,
              overrides=overrides, out_dir=out_root / method / category / f"seed{s}", seed=s)
         for category, s in keys]
results = dict(zip(keys, run_parallel(run_graded, calls, jobs, executor, ray_address)))
wall = time.perf_counter() - start
print(f"{len(elpv['categories'])} categories x {len(seeds)} seeds in {wall:.0f} s (load average "
      f"{os.getloadavg()[0]:.2f})")

# %%
KEYS = ("image_auroc", "image_ap", "image_f1max", "graded_spearman", "spearman_all", "fit_seconds",
        "predict_seconds_per_image", "peak_memory_mb", "n_parameters", "n_train")
runs = pd.DataFrame([{"category": c, "seed": s, **{k: m[k] for k in KEYS}} for (c, s), m in results.items()])
table = runs.groupby("category", sort=False)[list(KEYS)].mean()
table.loc["mean"] = runs.groupby("seed")[list(KEYS)].mean().mean()


def number(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 6)


missing = sorted({m.get("pixel_metrics_missing") or "" for m in results.values()} - {""})
QUALITY = ("image_auroc", "image_ap", "image_f1max", "graded_spearman", "spearman_all")
metrics = {"run": method, "method": implementation, "image_size": image_size, "seeds": seeds,
           "pixel_metrics": None, "pixel_metrics_missing": missing,
           **{c: {k: number(row[k]) for k in QUALITY} for c, row in table.iterrows()}}
costs = {"run": method, "stage_seconds": round(wall, 1), "load_average": round(os.getloadavg()[0], 2),
         **{c: {k: number(v) for k, v in row.items() if k not in QUALITY} for c, row in table.iterrows()}}
write_json(out_root / "metrics" / f"{method}.json", metrics)
write_json(out_root / method / "costs.json", costs)
table

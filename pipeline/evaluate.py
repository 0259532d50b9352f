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
# # Stage `evaluate`: fit one method on each category and score its test split, with several seeds
#
# `dvc repro` runs this notebook once per run of `run_methods` with papermill (`-f params.yaml -p method M`).
# For every category of `data` and every seed `seed, seed + 1, ..., seed + n_seeds - 1` it fits a fresh
# model on the defect-free `train/good` images only, predicts the test split, and writes `metrics.json`,
# `predictions.npz` and `overlays/` under `results/<dataset>/<run>/<category>/seed<k>/` (see
# `vadlab.evaluate.run`), plus all categories' metrics (mean and standard deviation over the seeds) in
# `results/<dataset>/metrics/<run>.json` (a DVC metric).
#
# The seed sets every random choice of a run: initial weights and data order of the trained methods, the
# random channels of PaDiM, the projection of semi-orthogonal embedding and of PatchCore's coreset.
# The (category, seed) runs are independent, so `jobs` of them run at once in worker processes
# (`vadlab.evaluate.run_parallel`); each run seeds itself, so the numbers do not depend on `jobs` beyond
# floating-point rounding.

# %% tags=["parameters"]
method = "padim"
seed = 0
n_seeds = 1
jobs = 1
executor = "local"  # or ray: every run a task on a Ray cluster (params.yaml `executor`, `ray_address`)
ray_address = None
feature_cache = None  # folder of the frozen-backbone feature cache (params.yaml `feature_cache`), None: off
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
methods = {"padim": {"image_size": 256, "preset": "paper", "set": {}}}
results_root = "results"

# %%
import os
import time
from pathlib import Path

import pandas as pd

from vadlab.data import check_dataset
from vadlab.evaluate import run, run_parallel, write_json
from vadlab.methods import run_settings

if feature_cache:  # every worker process started below inherits it (vadlab.backbones.FeatureCache)
    os.environ["VADLAB_FEATURE_CACHE"] = str(Path(feature_cache).resolve())

check_dataset(data["root"], data["categories"], data["name"])  # clear error (and how to get it) if absent
implementation, overrides, image_size = run_settings(method, methods)  # e.g. dmad_plus -> dmad, PDM+
seeds = [int(seed) + k for k in range(int(n_seeds))]
out_root = Path(results_root) / data["name"]
print(f"{method} ({implementation}) on {data['name']} {data['categories']} at {image_size} px, seeds {seeds}, "
      f"{jobs} jobs, overrides {overrides}")

# %%
start = time.perf_counter()
keys = [(category, s) for s in seeds for category in data["categories"]]
calls = [dict(method=implementation, data=data["root"], category=category, image_size=image_size,
              overrides=overrides, out_dir=out_root / method / category / f"seed{s}", seed=s)
         for category, s in keys]
results = dict(zip(keys, run_parallel(run, calls, jobs, executor, ray_address)))
wall = time.perf_counter() - start
print(f"{len(data['categories'])} categories x {len(seeds)} seeds in {wall:.0f} s")

# %%
KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max", "fit_seconds",
        "predict_seconds_per_image", "peak_memory_mb", "n_parameters")
runs = pd.DataFrame([{"category": c, "seed": s, **{k: m[k] for k in KEYS}} for (c, s), m in results.items()])
table = runs.groupby("category", sort=False)[list(KEYS)].mean()
spread = runs.groupby("category", sort=False)[list(KEYS)].std(ddof=1)  # NaN with one seed
# the mean row: mean over categories for each seed, then mean and spread of that over the seeds
per_seed = runs.groupby("seed")[list(KEYS)].mean()
table.loc["mean"], spread.loc["mean"] = per_seed.mean(), per_seed.std(ddof=1)


def rounded(row: pd.Series, std: pd.Series) -> dict:
    """Six decimals; a missing value (pixel metrics of an image-level-only dataset) stays null in the JSON."""
    def r(v):
        return None if pd.isna(v) else round(float(v), 6)
    out = {k: r(v) for k, v in row.items()}
    if len(seeds) > 1:
        out.update({f"{k}_std": r(v) for k, v in std.items() if k in KEYS[:6]})
    return out


# The DVC metric file holds the quality metrics only, so `dvc metrics diff` is empty unless a result
# changed; the cost figures (seconds, memory, parameters) go to `costs.json` in the run's own folder.
QUALITY, COST = KEYS[:6], KEYS[6:]
rows = {c: rounded(row, spread.loc[c]) for c, row in table.iterrows()}
metrics = {"run": method, "method": implementation, "image_size": image_size, "seeds": seeds,
           **{c: {k: v for k, v in r.items() if k.removesuffix("_std") in QUALITY} for c, r in rows.items()}}
costs = {"run": method, "stage_seconds": round(wall, 1),
         **{c: {k: v for k, v in r.items() if k in COST} for c, r in rows.items()}}
write_json(out_root / "metrics" / f"{method}.json", metrics)
write_json(out_root / method / "costs.json", costs)
for category, s in keys:
    assert (out_root / method / category / f"seed{s}" / "metrics.json").is_file()
table

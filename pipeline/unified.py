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
# # Stage `unified`: one model for every category (the multi-class protocol)
#
# DiAD's setting (and UniAD's before it): a single model is fitted on the normal training images of *all*
# categories together and then evaluated on each category's test split, without being told the category.
# `dvc repro` runs this notebook once per run of `unified_methods` (`-p method M`); settings come from
# `methods.<M>` in `params.yaml`, as for the per-category stage. Writes
# `results/<dataset>/unified/<run>/<category>/` (metrics.json, predictions.npz, overlays/) via
# `vadlab.evaluate.run_unified`, and all categories' metrics in `results/<dataset>/metrics/unified-<run>.json`.

# %% tags=["parameters"]
method = "padim"
seed = 0
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
methods = {"padim": {"image_size": 256, "preset": "paper", "set": {}}}
results_root = "results"
executor = "local"  # or ray: the one model trains as a task on a Ray cluster (params.yaml `executor`)
ray_address = None
feature_cache = None  # folder of the frozen-backbone feature cache (params.yaml `feature_cache`), None: off

# %%
import os
import time
from pathlib import Path

import pandas as pd

from vadlab.data import check_dataset
from vadlab.evaluate import run_parallel, run_unified, write_json
from vadlab.methods import run_settings

if feature_cache:  # every worker process started below inherits it (vadlab.backbones.FeatureCache)
    os.environ["VADLAB_FEATURE_CACHE"] = str(Path(feature_cache).resolve())

check_dataset(data["root"], data["categories"], data["name"])  # clear error (and how to get it) if absent
implementation, overrides, image_size = run_settings(method, methods)  # e.g. dmad_plus -> dmad, PDM+
out_root = Path(results_root) / data["name"]
print(f"unified {method} ({implementation}) on {data['name']} {data['categories']} at {image_size} px, "
      f"overrides {overrides}")

# %%
start = time.perf_counter()
call = dict(method=implementation, data=data["root"], categories=list(data["categories"]), image_size=image_size,
            overrides=overrides, out_dir=out_root / "unified" / method, seed=int(seed))
results = run_parallel(run_unified, [call], 1, executor, ray_address)[0]
wall = time.perf_counter() - start
print(f"one model, {len(results)} categories, {wall:.0f} s")

# %%
KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max", "fit_seconds",
        "predict_seconds_per_image", "peak_memory_mb", "n_parameters")
table = pd.DataFrame({c: {k: m[k] for k in KEYS} for c, m in results.items()}).T
table.loc["mean"] = table.mean()
# quality metrics in the DVC metric file, cost figures in `costs.json` beside the run's outputs
QUALITY, COST = KEYS[:6], KEYS[6:]
metrics = {"run": method, "method": implementation, "protocol": "unified", "image_size": image_size,
           **{c: {k: round(float(row[k]), 6) for k in QUALITY} for c, row in table.iterrows()}}
costs = {"run": method, "stage_seconds": round(wall, 1),
         **{c: {k: round(float(row[k]), 6) for k in COST} for c, row in table.iterrows()}}
write_json(out_root / "metrics" / f"unified-{method}.json", metrics)
write_json(out_root / "unified" / method / "costs.json", costs)
table

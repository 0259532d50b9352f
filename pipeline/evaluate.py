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
# # Stage `evaluate`: fit one method on one category and score its test split
#
# `dvc repro` runs this notebook once per (method, category) with papermill (`-f params.yaml -p method M
# -p category C`). It fits on the defect-free `train/good` images only, predicts the test split, and writes
# `metrics.json`, `predictions.npz` and `overlays/` under `results/<dataset>/<method>/<category>/`
# (see `vadlab.evaluate.run`).

# %% tags=["parameters"]
method = "padim"
category = "brick"
seed = 0
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
methods = {"padim": {"image_size": 256, "preset": "paper", "set": {}}}
results_root = "results"

# %%
import json
from pathlib import Path

from vadlab.evaluate import run
from vadlab.methods import preset_overrides


if method not in methods:
    raise KeyError(f"params.yaml has no settings for method {method!r} under `methods:`")
settings = methods[method]
implementation = settings.get("method", method)  # a run name may select a variant, e.g. dmad_plus -> dmad
overrides = {**preset_overrides(implementation, settings.get("preset", "paper")), **(settings.get("set") or {})}
out_dir = Path(results_root) / data["name"] / method / category
print(f"{method} on {data['name']}/{category} at {settings['image_size']} px, overrides {overrides}")

# %%
metrics = run(implementation, data["root"], category, image_size=int(settings["image_size"]), overrides=overrides,
              out_dir=out_dir, seed=int(seed))
summary = {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max",
                                   "pixel_f1max", "fit_seconds", "predict_seconds_per_image")}
print(json.dumps(summary, indent=2))
assert (out_dir / "metrics.json").is_file() and (out_dir / "predictions.npz").is_file()

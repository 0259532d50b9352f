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
# # Stage `tables`: aggregate every `metrics.json` into CSV and markdown tables
#
# Reads `results/<dataset>/<method>/<category>/metrics.json` for the methods and categories selected in
# `params.yaml` and writes `results/tables/` (read by the book) and `results/summary.json` (a DVC metric:
# the mean over categories per method).

# %% tags=["parameters"]
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
run_methods = ["padim"]
results_root = "results"

# %%
import json
from pathlib import Path

import pandas as pd

METRICS = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max"]
COSTS = ["fit_seconds", "predict_seconds_per_image", "peak_memory_mb", "n_parameters"]
root = Path(results_root)
tables = root / "tables"
tables.mkdir(parents=True, exist_ok=True)

rows, missing = [], []
for method in run_methods:
    for category in data["categories"]:
        path = root / data["name"] / method / category / "metrics.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        m = json.loads(path.read_text())
        rows.append({"dataset": data["name"], "method": method, "category": category,
                     "image_size": m.get("image_size"), **{k: m.get(k) for k in METRICS + COSTS}})
if missing:
    raise FileNotFoundError(f"metrics missing for {len(missing)} runs, e.g. {missing[:3]}: run `dvc repro`")
per_category = pd.DataFrame(rows)
per_category[METRICS] = per_category[METRICS].astype(float)
per_category

# %% [markdown]
# Means over categories (each category weighs the same, as in the papers' tables).

# %%
summary = (per_category.groupby("method", sort=False)[METRICS + COSTS].mean()
           .reindex(run_methods).reset_index())
summary.insert(1, "n_categories", per_category.groupby("method", sort=False).size().reindex(run_methods).values)
summary

# %%
def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """GitHub-flavoured markdown table with fixed decimals (integers stay integers)."""
    return df.to_markdown(index=False, floatfmt=f".{digits}f") + "\n"


per_category.to_csv(tables / "per_category.csv", index=False, float_format="%.6g")
summary.to_csv(tables / "summary.csv", index=False, float_format="%.6g")
(tables / "per_category.md").write_text(to_markdown(per_category.drop(columns=["dataset"])))
(tables / "summary.md").write_text(to_markdown(summary))
for metric in ("image_auroc", "pixel_auroc", "aupro"):
    pivot = per_category.pivot(index="method", columns="category", values=metric).reindex(
        index=run_methods, columns=data["categories"])
    pivot["mean"] = pivot.mean(axis=1)
    pivot.reset_index().to_csv(tables / f"{metric}.csv", index=False, float_format="%.6g")
    (tables / f"{metric}.md").write_text(to_markdown(pivot.reset_index()))

dvc_metrics = {"dataset": data["name"],
               **{m: {k: round(float(v), 6) for k, v in r.items() if k in METRICS}
                  for m, r in summary.set_index("method").iterrows()}}
(root / "summary.json").write_text(json.dumps(dvc_metrics, indent=2) + "\n")
print(sorted(p.name for p in tables.iterdir()))

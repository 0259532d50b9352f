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
# # Stage `figures`: draw the result figures the book shows
#
# Reads `results/<dataset>/<method>/<category>/predictions.npz` and `results/tables/per_category.csv`,
# writes PNGs to `results/figures/`: per method, example anomaly maps and image-level ROC curves; for all
# methods, a bar chart of image AUROC, pixel AUROC and AUPRO per category.

# %% tags=["parameters"]
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
run_methods = ["padim"]
figures = {"n_examples": 4}
results_root = "results"

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from PIL import Image
from sklearn.metrics import roc_curve

root = Path(results_root)
out = root / "figures"
out.mkdir(parents=True, exist_ok=True)
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "font.size": 9})


def load(method: str, category: str) -> dict:
    with np.load(root / data["name"] / method / category / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


# %% [markdown]
# Example maps: for each category the highest-scoring defective images, with the ground truth outlined.
# One colour scale per category (display only; the metrics use the raw scores).

# %%
n = int(figures["n_examples"])
for method in run_methods:
    cats = data["categories"]
    fig, axes = plt.subplots(len(cats), 2 * n, figsize=(1.3 * 2 * n, 1.45 * len(cats)), squeeze=False)
    for r, category in enumerate(cats):
        p = load(method, category)
        maps = p["maps"].astype(np.float32)
        lo, hi = np.percentile(maps, [1, 99.9])
        defective = [i for i in np.argsort(-p["scores"]) if p["labels"][i] == 1]
        picks = defective[: n - 1] + [int(np.argmax(np.where(p["labels"] == 0, p["scores"], -np.inf)))]
        for k, i in enumerate(picks):
            img = Image.open(str(p["paths"][i])).convert("RGB").resize(maps.shape[1:][::-1])
            a0, a1 = axes[r, 2 * k], axes[r, 2 * k + 1]
            a0.imshow(img)
            a1.imshow(img)
            a1.imshow(maps[i], cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
            if p["masks"][i].any():
                for a in (a0, a1):
                    a.contour(p["masks"][i], levels=[0.5], colors="w", linewidths=0.6)
            a0.set_title(f"{category}: {p['defects'][i]}", fontsize=7)
            a1.set_title(f"score {p['scores'][i]:.2f}", fontsize=7)
            a0.axis("off")
            a1.axis("off")
    fig.tight_layout()
    fig.savefig(out / f"{method}_examples.png")
    plt.show()

# %% [markdown]
# Image-level ROC curves, one per category.

# %%
for method in run_methods:
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for category in data["categories"]:
        p = load(method, category)
        fpr, tpr, _ = roc_curve(p["labels"], p["scores"])
        ax.plot(fpr, tpr, label=category)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate (normal images)", ylabel="true-positive rate (defective images)",
           title=f"{method}: image-level ROC", aspect="equal")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{method}_roc.png")
    plt.show()

# %% [markdown]
# All methods side by side.

# %%
table = pd.read_csv(root / "tables" / "per_category.csv")
long = table.melt(id_vars=["method", "category"], value_vars=["image_auroc", "pixel_auroc", "aupro"],
                  var_name="metric", value_name="value")
grid = sns.catplot(data=long, x="category", y="value", hue="method", col="metric", kind="bar",
                   height=2.8, aspect=1.25, order=data["categories"], hue_order=run_methods)
grid.set(ylim=(0, 1.02))
grid.set_xticklabels(rotation=45)
grid.savefig(out / "metrics_by_category.png")
plt.show()
print(sorted(p.name for p in out.iterdir()))

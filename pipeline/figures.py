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
# Reads `results/<dataset>/<run>/<category>/seed<seed>/predictions.npz` (the first seed's runs), the
# unified runs' predictions, and `results/tables/`, and writes PNGs to `results/figures/`: a grid of
# anomaly maps (the same test images, every method side by side, with the ground truth outlined), an
# accuracy-versus-speed scatter, heatmaps of the per-category metrics, and per method its highest-scoring
# test images and image-level ROC curves.
# Colour scales are for display only (one per method and category); the metrics use the raw scores.

# %% tags=["parameters"]
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
seed = 0
run_methods = ["padim"]
unified_methods = []
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

from vadlab.report import run_folder
from vadlab.visualize import CMAP

root = Path(results_root)
out = root / "figures"
out.mkdir(parents=True, exist_ok=True)
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "font.size": 9})
categories = list(data["categories"])


def load(run: str, category: str, unified: bool = False) -> dict:
    """Predictions of one category (a per-category run: its first seed's)."""
    with np.load(root / run_folder(data["name"], run, category, seed, unified) / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def picture(path: str, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.open(str(path)).convert("RGB").resize(shape[::-1]))


# %% [markdown]
# ## The same test images, every method
#
# Per category, two defective test images fixed in advance (the first and the middle one of the sorted
# defective test files, chosen without looking at any method's output), their ground truth (white
# outline) and each method's anomaly map. Unified runs (one model for all categories) are marked `(u)`.

# %%
columns = [(m, False) for m in run_methods] + [(m, True) for m in unified_methods]
reference = {c: load(run_methods[0], c) for c in categories}
picks = []
for c in categories:
    defective = sorted(str(p) for p, y in zip(reference[c]["paths"], reference[c]["labels"]) if y == 1)
    picks += [(c, defective[0]), (c, defective[len(defective) // 2])]
fig, axes = plt.subplots(len(picks), len(columns) + 1, figsize=(1.15 * (len(columns) + 1), 1.2 * len(picks)),
                         squeeze=False)
for col, (run, unified) in enumerate(columns, start=1):
    axes[0, col].set_title(run.replace("_", "\n") + (" (u)" if unified else ""), fontsize=7)
    for row, (c, path) in enumerate(picks):
        p = load(run, c, unified)
        i = [str(q) for q in p["paths"]].index(path)
        maps = p["maps"].astype(np.float32)
        lo, hi = np.percentile(maps, [1, 99.9])
        ax = axes[row, col]
        ax.imshow(picture(path, maps.shape[1:]))
        ax.imshow(maps[i], cmap=CMAP, alpha=0.5, vmin=lo, vmax=hi)
        if p["masks"][i].any():
            ax.contour(p["masks"][i], levels=[0.5], colors="w", linewidths=0.5)
for row, (c, path) in enumerate(picks):
    p = reference[c]
    i = [str(q) for q in p["paths"]].index(path)
    axes[row, 0].imshow(picture(path, p["maps"].shape[1:]))
    axes[row, 0].contour(p["masks"][i], levels=[0.5], colors="r", linewidths=0.6)
    axes[row, 0].set_ylabel(f"{c}\n{p['defects'][i]}", fontsize=7)
axes[0, 0].set_title("image + mask", fontsize=7)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout(pad=0.2)
fig.savefig(out / "maps_grid.png")
plt.show()

# %% [markdown]
# ## Accuracy versus speed

# %%
summary = pd.read_csv(root / "tables" / "summary.csv").set_index("method")
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, metric, label in ((axes[0], "image_auroc", "image AUROC"), (axes[1], "aupro", "AUPRO")):
    x = 1000 * summary["predict_seconds_per_image"]
    ax.errorbar(x, summary[metric], yerr=summary.get(f"{metric}_std"), fmt="none", ecolor="0.6", lw=0.8)
    ax.scatter(x, summary[metric], s=20 + 60 * np.log10(1 + summary["fit_seconds"]), c="tab:blue", alpha=0.7)
    for name, xi, yi in zip(summary.index, x, summary[metric]):
        ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="inference time per image (ms, log scale)", ylabel=f"mean {label}",
           title=f"{label} vs inference time (marker size: fit time; bars: ±1 std over seeds)")
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / "accuracy_vs_speed.png")
plt.show()

# %% [markdown]
# ## Per-category heatmaps

# %%
table = pd.read_csv(root / "tables" / "per_category.csv")
metrics = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")]
fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 0.45 * len(run_methods) + 1.6))
for ax, (metric, label) in zip(axes, metrics):
    grid = table.pivot_table(index="method", columns="category", values=metric, aggfunc="mean").reindex(
        index=run_methods, columns=categories)  # mean over seeds
    grid["mean"] = grid.mean(axis=1)
    sns.heatmap(grid, ax=ax, vmin=0.5, vmax=1.0, cmap="viridis", annot=True, fmt=".2f", annot_kws={"size": 7},
                cbar=False)
    ax.set(title=label, xlabel="", ylabel="")
fig.tight_layout()
fig.savefig(out / "heatmap.png")
plt.show()

# %%
long = table.melt(id_vars=["method", "category", "seed"], value_vars=["image_auroc", "pixel_auroc", "aupro"],
                  var_name="metric", value_name="value")
grid = sns.catplot(data=long, x="category", y="value", hue="method", col="metric", kind="bar",
                   height=2.8, aspect=1.5, order=categories, hue_order=run_methods, errorbar="sd")
grid.set(ylim=(0, 1.02))
grid.set_xticklabels(rotation=45)
grid.savefig(out / "metrics_by_category.png")
plt.show()

# %% [markdown]
# ## Per method: highest-scoring test images and ROC curves
#
# For each category the highest-scoring defective images and the highest-scoring normal one (last pair).

# %%
n = int(figures["n_examples"])
for method in run_methods:
    fig, axes = plt.subplots(len(categories), 2 * n, figsize=(1.3 * 2 * n, 1.45 * len(categories)), squeeze=False)
    for r, category in enumerate(categories):
        p = load(method, category)
        maps = p["maps"].astype(np.float32)
        lo, hi = np.percentile(maps, [1, 99.9])
        defective = [i for i in np.argsort(-p["scores"]) if p["labels"][i] == 1]
        chosen = defective[: n - 1] + [int(np.argmax(np.where(p["labels"] == 0, p["scores"], -np.inf)))]
        for k, i in enumerate(chosen):
            img = picture(p["paths"][i], maps.shape[1:])
            a0, a1 = axes[r, 2 * k], axes[r, 2 * k + 1]
            a0.imshow(img)
            a1.imshow(img)
            a1.imshow(maps[i], cmap=CMAP, alpha=0.5, vmin=lo, vmax=hi)
            if p["masks"][i].any():
                for a in (a0, a1):
                    a.contour(p["masks"][i], levels=[0.5], colors="w", linewidths=0.6)
            a0.set_title(f"{category}: {p['defects'][i]}", fontsize=7)
            a1.set_title(f"score {p['scores'][i]:.2f}", fontsize=7)
            a0.axis("off")
            a1.axis("off")
    fig.tight_layout()
    fig.savefig(out / f"{method}_examples.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for category in categories:
        p = load(method, category)
        fpr, tpr, _ = roc_curve(p["labels"], p["scores"])
        ax.plot(fpr, tpr, label=category)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate (normal images)", ylabel="true-positive rate (defective images)",
           title=f"{method}: image-level ROC", aspect="equal")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{method}_roc.png")
    plt.close(fig)
print(sorted(p.name for p in out.iterdir()))

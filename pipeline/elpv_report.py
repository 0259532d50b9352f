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
# # Stage `elpv_report`: tables and figures of the runs on the real ELPV solar cells
#
# Reads `results/elpv/<run>/<category>/seed<k>/` (metrics.json, predictions.npz, graded.csv) for every run
# of `run_methods` and the generated data's `results/tables/summary.csv`, and writes `results/elpv_report/tables/`
# (CSV and markdown; pixel metrics are an em dash: ELPV has image labels only), `results/elpv_report/figures/`
# (anomaly maps on real cells, score histograms normal vs defective, score vs the annotators' defect
# probability) and `results/elpv_report/metrics/summary.json` (a DVC metric).

# %% tags=["parameters"]
seed = 0
run_methods = ["padim"]
elpv = {"root": "build/elpv", "n_seeds": 1, "categories": ["mono", "poly"]}
results_root = "results"

# %%
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import spearmanr

from vadlab.evaluate import write_json
from vadlab.visualize import CMAP

root = Path(results_root)
tables, figures = root / "elpv_report" / "tables", root / "elpv_report" / "figures"
tables.mkdir(parents=True, exist_ok=True)
figures.mkdir(parents=True, exist_ok=True)
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "font.size": 9})
runs, categories = list(run_methods), list(elpv["categories"])
seeds = [int(seed) + k for k in range(int(elpv["n_seeds"]))]
IMAGE = ["image_auroc", "image_ap", "image_f1max"]
PIXEL = ["pixel_auroc", "aupro", "pixel_ap", "pixel_f1max"]
GRADED = ["graded_spearman", "spearman_all"]
COSTS = ["fit_seconds", "predict_seconds_per_image", "peak_memory_mb", "n_train"]


def run_dir(run: str, category: str, s: int = int(seed)) -> Path:
    return root / "elpv" / run / category / f"seed{s}"


rows, missing = [], []
for run in runs:
    for category in categories:
        for s in seeds:
            path = run_dir(run, category, s) / "metrics.json"
            if not path.is_file():
                missing.append(str(path))
                continue
            m = json.loads(path.read_text())
            rows.append({"method": run, "category": category, "seed": s, "image_size": m["image_size"],
                         **{k: m.get(k) for k in IMAGE + PIXEL + GRADED + COSTS}})
if missing:
    raise FileNotFoundError(f"ELPV metrics missing for {len(missing)} runs, e.g. {missing[:3]}: run `dvc repro`")
frame = pd.DataFrame(rows)
frame[IMAGE + PIXEL + GRADED + COSTS] = frame[IMAGE + PIXEL + GRADED + COSTS].astype(float)
assert frame[PIXEL].isna().all().all(), "ELPV has no pixel masks: pixel metrics must be absent"
frame.to_csv(tables / "per_category.csv", index=False, float_format="%.6g")


def to_markdown(df: pd.DataFrame, digits: int = 3, std: pd.DataFrame | None = None) -> str:
    """Markdown with fixed decimals, "mean ± std" where ``std`` is given, an em dash for a missing value."""
    def cell(m, d):
        if isinstance(m, str):
            return m
        if pd.isna(m):
            return "—"
        return f"{m:.{digits}f}" + ("" if d is None or pd.isna(d) else f" ± {d:.{digits}f}")
    sd = std.reindex_like(df).to_numpy() if std is not None else np.full(df.shape, None)
    cells = [[cell(m, d) for m, d in zip(rm, rd)] for rm, rd in zip(df.to_numpy(dtype=object), sd)]
    return pd.DataFrame(cells, index=df.index, columns=df.columns).to_markdown(disable_numparse=True) + "\n"


def by_category(metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) over seeds, categories as rows and runs as columns, plus the mean row over categories."""
    g = frame.groupby(["category", "method"])[metric]
    mean = g.mean().unstack("method").reindex(index=categories, columns=runs)
    std = g.std(ddof=1).unstack("method").reindex(index=categories, columns=runs)
    per_seed = frame.groupby(["method", "seed"])[metric].mean()
    mean.loc["mean"] = per_seed.groupby("method").mean().reindex(runs)
    std.loc["mean"] = per_seed.groupby("method").std(ddof=1).reindex(runs)
    mean.index.name = std.index.name = "category"
    return mean, std


for metric in IMAGE + GRADED:
    mean, std = by_category(metric)
    mean.to_csv(tables / f"{metric}.csv", float_format="%.6g")
    std.to_csv(tables / f"{metric}_std.csv", float_format="%.6g")
    (tables / f"{metric}.md").write_text(to_markdown(mean, std=std))
by_category("image_auroc")[0].round(3)

# %% [markdown]
# ## Summary per run, and the generated data beside it
#
# One row per run: image metrics per category and their mean; the pixel metrics are absent (em dash; ELPV
# has no masks); the graded-set Spearman correlations; the generated data's mean image AUROC and AUPRO
# (from the `tables` stage) and each run's rank on both datasets (1 = best image AUROC).

# %%
wide = frame.groupby(["method", "category"])["image_auroc"].mean().unstack("category").reindex(
    index=runs, columns=categories).add_prefix("image_auroc_")
summary = frame.groupby("method", sort=False)[IMAGE + PIXEL + GRADED + COSTS].mean().reindex(runs)
summary = wide.join(summary)
generated_path = root / "tables" / "summary.csv"
generated = pd.read_csv(generated_path).set_index("method").reindex(runs)
summary["generated_image_auroc"] = generated["image_auroc"]
summary["generated_aupro"] = generated["aupro"]
summary["rank_elpv"] = summary["image_auroc"].rank(ascending=False)
summary["rank_generated"] = summary["generated_image_auroc"].rank(ascending=False)
summary.index.name = "method"
summary.to_csv(tables / "summary.csv", float_format="%.6g")
shown = summary[[f"image_auroc_{c}" for c in categories] + ["image_auroc", "pixel_auroc", "aupro",
                                                          "graded_spearman", "generated_image_auroc"]]
(tables / "summary.md").write_text(to_markdown(shown))
rank_rho = float(spearmanr(summary["image_auroc"], summary["generated_image_auroc"]).statistic)
shown.round(3)

# %% [markdown]
# ## Anomaly maps on real cells
#
# Per category, two defective test cells and one normal test cell fixed in advance (the first and the
# middle defective file and the first normal file by name, chosen without looking at any output), and each
# run's map. ELPV has no masks, so there is no outline: judge the maps against the visible cracks and dark
# (inactive) regions. Colour scale per run and category (1st to 99.9th percentile of its maps).

# %%
def load(run: str, category: str) -> dict:
    with np.load(run_dir(run, category) / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def picture(path: str, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.open(str(path)).convert("RGB").resize(shape[::-1]))


picks = []
for c in categories:
    p = load(runs[0], c)
    files = [str(q) for q in p["paths"]]
    defective = sorted(f for f, y in zip(files, p["labels"]) if y == 1)
    normal = sorted(f for f, y in zip(files, p["labels"]) if y == 0)
    picks += [(c, defective[0], "p = 1"), (c, defective[len(defective) // 2], "p = 1"), (c, normal[0], "p = 0")]
fig, axes = plt.subplots(len(picks), len(runs) + 1, figsize=(1.15 * (len(runs) + 1), 1.2 * len(picks)),
                         squeeze=False)
for col, run in enumerate(runs, start=1):
    axes[0, col].set_title(run.replace("_", "\n"), fontsize=7)
    for row, (c, path, _) in enumerate(picks):
        p = load(run, c)
        i = [str(q) for q in p["paths"]].index(path)
        maps = p["maps"].astype(np.float32)
        lo, hi = np.percentile(maps, [1, 99.9])
        axes[row, col].imshow(picture(path, maps.shape[1:]))
        axes[row, col].imshow(maps[i], cmap=CMAP, alpha=0.5, vmin=lo, vmax=hi)
for row, (c, path, label) in enumerate(picks):
    axes[row, 0].imshow(picture(path, (300, 300)))
    axes[row, 0].set_ylabel(f"{c}\n{label}", fontsize=7)
axes[0, 0].set_title("cell", fontsize=7)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout(pad=0.2)
fig.savefig(figures / "maps_grid.png")
plt.show()

# %% [markdown]
# ## Score histograms: normal versus defective test cells
#
# Each run's image scores of the p = 0 and p = 1 test cells (first seed), per category; the overlap is what
# the image AUROC measures.

# %%
fig, axes = plt.subplots(len(categories), len(runs), figsize=(1.6 * len(runs), 1.6 * len(categories)),
                         squeeze=False)
for r, c in enumerate(categories):
    for k, run in enumerate(runs):
        p = load(run, c)
        bins = np.histogram_bin_edges(p["scores"], bins=30)
        ax = axes[r, k]
        ax.hist(p["scores"][p["labels"] == 0], bins=bins, alpha=0.6, density=True, label="p = 0", color="tab:blue")
        ax.hist(p["scores"][p["labels"] == 1], bins=bins, alpha=0.6, density=True, label="p = 1", color="tab:red")
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
        if r == 0:
            ax.set_title(run, fontsize=7)
        if k == 0:
            ax.set_ylabel(c)
axes[0, 0].legend(fontsize=6)
fig.tight_layout(pad=0.3)
fig.savefig(figures / "score_histograms.png")
plt.show()

# %% [markdown]
# ## Does the score rise with the annotators' defect probability?
#
# Each cell's score as its percentile among all scored cells of the run (p = 0 and p = 1 test cells and the
# graded 1/3 and 2/3 cells), averaged per probability level (first seed). A method whose score follows the
# annotators' confidence rises from left to right; `graded_spearman` in the tables is the rank correlation
# of score and probability within the graded cells only, `spearman_all` over all four levels.

# %%
fig, axes = plt.subplots(1, len(categories), figsize=(4.2 * len(categories), 3.4), squeeze=False)
for ax, c in zip(axes[0], categories):
    for run in runs:
        p = load(run, c)
        graded = pd.read_csv(run_dir(run, c) / "graded.csv")
        probs = np.concatenate([p["labels"].astype(float), graded["probability"].to_numpy()])
        scores = np.concatenate([p["scores"], graded["score"].to_numpy()])
        pct = pd.Series(scores).rank(pct=True).to_numpy()
        levels = np.unique(np.round(3 * probs)) / 3
        ax.plot(levels, [pct[np.isclose(probs, q)].mean() for q in levels], marker="o", ms=3, lw=1, label=run)
    ax.set(xticks=[0, 1 / 3, 2 / 3, 1], xticklabels=["0", "1/3", "2/3", "1"], xlabel="defect probability",
           ylabel="mean score percentile", title=c, ylim=(0, 1))
    ax.grid(alpha=0.3)
axes[0, -1].legend(fontsize=6, ncol=2)
fig.tight_layout()
fig.savefig(figures / "graded.png")
plt.show()

# %%
dvc_metrics = {"dataset": "elpv", "rank_spearman_generated_vs_elpv": round(rank_rho, 6),
               "per_run": {m: {k: (None if pd.isna(v) else round(float(v), 6))
                               for k, v in r[[f"image_auroc_{c}" for c in categories] + IMAGE + GRADED].items()}
                           for m, r in summary.iterrows()}}
write_json(root / "elpv_report" / "metrics" / "summary.json", dvc_metrics)
print(sorted(p.name for p in tables.iterdir()), sorted(p.name for p in figures.iterdir()))

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
# # Stage `curves`: the data behind `dvc plots show` and `dvc plots diff`
#
# Reads every run's `predictions.npz` (per-category runs: the first seed; unified runs: their one model),
# on the generated data and on the real ELPV cells, and writes one CSV file per kind of curve under
# `results/plots/<dataset>/`, every run's curve in it
# (a `run` column), which `dvc.yaml`'s `plots:` section draws as one line per run:
#
# - `image_roc.csv` (`fpr`, `tpr`): the image-level ROC curve, averaged over the categories vertically
#   (the true-positive rate of each category at the same false-positive rates, then the mean; Fawcett,
#   "An introduction to ROC analysis", Pattern Recognition Letters 27, 2006). The area under it is the
#   mean image AUROC.
# - `image_pr.csv` (`recall`, `precision`): the image-level precision-recall curve, the interpolated
#   precision (the best precision at a recall of at least r) averaged over categories.
# - `pixel_pro.csv` (`fpr`, `pro`): the per-region-overlap curve on [0, 0.3], averaged over the
#   categories that have pixel masks (AUPRO is the area under it divided by 0.3); absent when none has.
# - `scores.csv` (`images`: normal or defective, `z`, `count`): histograms of the image scores, each
#   category's scores standardised by the mean and standard deviation of its normal test images (for
#   display only: every metric uses the raw scores).
# - `training.csv` (`category`, `step`, `loss`): the training loss each trained method logged
#   (`history.csv` of its runs: per epoch, or per step and stage), for every category.
#
# A run averages the categories so that one figure compares all runs; per-category ROC curves are in
# the `figures` stage's `<run>_roc.png`.

# %% tags=["parameters"]
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
elpv = None  # the real ELPV cells (params.yaml `elpv`): their per-category runs get curves too
seed = 0
run_methods = ["padim"]
unified_methods = []
results_root = "results"

# %%
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from vadlab.metrics import pro_curve
from vadlab.report import run_folder

root = Path(results_root)
FPR = np.linspace(0.0, 1.0, 101)
RECALL = np.linspace(0.0, 1.0, 101)
PRO_FPR = np.linspace(0.0, 0.3, 61)
Z_BINS = np.linspace(-4.0, 16.0, 41)


def predictions(dataset: str, run: str, category: str, unified: bool) -> dict:
    path = root / run_folder(dataset, run, category, seed, unified) / "predictions.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro` (the evaluate and unified stages)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run_curves(dataset: str, categories: list[str], run: str, unified: bool) -> dict[str, pd.DataFrame]:
    tprs, precisions, pros, normal, defective = [], [], [], 0, 0
    for category in categories:
        p = predictions(dataset, run, category, unified)
        labels, scores = p["labels"].astype(int), p["scores"].astype(np.float64)
        fpr, tpr, _ = roc_curve(labels, scores)
        tprs.append(np.interp(FPR, fpr, tpr))
        precision, recall, _ = precision_recall_curve(labels, scores)
        best = np.maximum.accumulate(precision)  # recall falls along the arrays: best precision at recall >= r
        precisions.append(np.interp(RECALL, recall[::-1], best[::-1]))
        masks = p["masks"]
        if masks.any():  # pixel masks exist (image-level-only datasets have none)
            fpr_p, pro = pro_curve(masks, p["maps"].astype(np.float32))
            pros.append(np.interp(PRO_FPR, fpr_p, pro))
        good = scores[labels == 0]
        z = (scores - good.mean()) / max(good.std(), 1e-12)
        normal = normal + np.histogram(np.clip(z[labels == 0], Z_BINS[0], Z_BINS[-1]), Z_BINS)[0]
        defective = defective + np.histogram(np.clip(z[labels == 1], Z_BINS[0], Z_BINS[-1]), Z_BINS)[0]
    centres = (Z_BINS[:-1] + Z_BINS[1:]) / 2
    curves = {"image_roc": pd.DataFrame({"fpr": FPR, "tpr": np.mean(tprs, axis=0)}),
              "image_pr": pd.DataFrame({"recall": RECALL, "precision": np.mean(precisions, axis=0)}),
              "scores": pd.concat([pd.DataFrame({"images": "normal", "z": centres, "count": normal}),
                                   pd.DataFrame({"images": "defective", "z": centres, "count": defective})])}
    if pros:
        curves["pixel_pro"] = pd.DataFrame({"fpr": PRO_FPR, "pro": np.mean(pros, axis=0)})
    histories = []
    for category in categories:  # trained methods log their loss; memory banks and Gaussians have none
        path = root / run_folder(dataset, run, category, seed, unified) / "history.csv"
        if path.is_file():
            loss = pd.read_csv(path)["loss"].to_numpy()
            histories.append(pd.DataFrame({"category": category, "step": np.arange(1, len(loss) + 1), "loss": loss}))
    if histories:
        curves["training"] = pd.concat(histories)
    return curves


# %%
datasets = [(data["name"], list(data["categories"]),
             [(r, False) for r in run_methods] + [(r, True) for r in unified_methods])]
if elpv:  # the real cells: the per-category runs only (no unified stage on ELPV)
    datasets.append(("elpv", list(elpv["categories"]), [(r, False) for r in run_methods]))
for dataset, categories, runs in datasets:
    frames: dict[str, list[pd.DataFrame]] = {}
    for run, unified in runs:
        name = f"unified-{run}" if unified else run
        for kind, frame in run_curves(dataset, categories, run, unified).items():
            frames.setdefault(kind, []).append(frame.assign(run=name))
    out = root / "plots" / dataset
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.csv"):
        stale.unlink()
    for kind, parts in frames.items():
        table = pd.concat(parts)
        table = table[["run", *[c for c in table.columns if c != "run"]]].round(6)
        tmp = out / f".{kind}.csv.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(out / f"{kind}.csv")
    print(dataset, sorted(p.name for p in out.iterdir()))

# %% [markdown]
# The vertical average is exact for the area: the mean of the categories' AUROCs equals the area under
# the averaged curve, up to the grid's resolution. Checked here on the first run:

# %%
from vadlab.metrics import auroc

dataset, categories, runs = datasets[0]
first = runs[0]
roc = pd.read_csv(root / "plots" / dataset / "image_roc.csv")
roc = roc[roc["run"] == (f"unified-{first[0]}" if first[1] else first[0])]
area = float(np.trapezoid(roc["tpr"], roc["fpr"]))
mean_auroc = float(np.mean([auroc(p["labels"], p["scores"])
                            for p in (predictions(dataset, first[0], c, first[1]) for c in categories)]))
print(f"{first[0]}: area under the averaged ROC {area:.4f}, mean AUROC {mean_auroc:.4f}")
assert abs(area - mean_auroc) < 0.02, (area, mean_auroc)

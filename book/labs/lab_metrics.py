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
# # Lab: evaluation metrics, AUROC from ranks and AUPRO
#
# **Learning goals.** After this lab you can
# - compute the AUROC without drawing a curve, from the ranks of the scores (the Mann-Whitney statistic), with
#   ties handled correctly;
# - implement AUPRO, the per-region overlap metric of MVTec AD, and say why a small defect weighs as much as a
#   big one;
# - predict how smoothing the anomaly maps moves pixel AUROC and AUPRO, and check it with the pipeline.
#
# **Expected time:** 60 minutes (15 for AUROC, 30 for AUPRO, 15 for the open question).
#
# **Before you start:** read the metrics part of the chapter *Data and metrics*.

# %%
import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
from scipy import ndimage
from scipy.stats import rankdata

from vadlab.labs import check_aupro, check_auroc, results_table, show_params
from vadlab.metrics import aupro as package_aupro
from vadlab.metrics import pixel_auroc, pro_curve

plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. AUROC from ranks
#
# The AUROC is the probability that a random anomalous sample scores higher than a random normal one (a tie
# counts one half). Sort all $n = n_+ + n_-$ scores and give them ranks $1..n$ (tied scores share their
# average rank). If $R_+$ is the sum of the ranks of the anomalous samples, then
#
# $$ \mathrm{AUROC} = \frac{R_+ - n_+ (n_+ + 1) / 2}{n_+ \, n_-}, $$
#
# because $R_+ - n_+(n_+ + 1)/2$ counts, over all anomalous samples, how many normal samples rank below each.
#
# **Exercise 1.** Write `auroc(labels, scores)` for numpy arrays `labels` (0 = normal, 1 = anomalous) and
# `scores`. `scipy.stats.rankdata` is allowed.

# %% tags=["solution"]
def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic."""
    # BEGIN SOLUTION
    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(scores)  # ties get their average rank
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    # END SOLUTION


# %%
ok_auroc = check_auroc(auroc)

# %% [markdown]
# ## 2. AUPRO
#
# Pixel AUROC pools all pixels: a method that finds one huge defect and misses ten small ones still scores
# well. The **per-region overlap** averages over the connected defect regions $C_k$ (8-connectivity, each image
# on its own) instead. For a threshold $t$ ("a pixel is anomalous if its score $\ge t$"):
#
# $$ \mathrm{PRO}(t) = \frac{1}{K} \sum_{k=1}^{K} \frac{|\{p \in C_k : s_p \ge t\}|}{|C_k|}, \qquad
#    \mathrm{FPR}(t) = \frac{|\{p \text{ defect-free} : s_p \ge t\}|}{|\{p \text{ defect-free}\}|}. $$
#
# Every distinct score is one threshold. The curve of the points $(\mathrm{FPR}(t), \mathrm{PRO}(t))$ starts at
# $(0, 0)$; AUPRO is the area under it from FPR 0 to `fpr_limit` (trapezoids; interpolate PRO linearly at
# `fpr_limit` if no point lies exactly there), divided by `fpr_limit` so that a perfect map scores 1.
#
# **Exercise 2.** Write `aupro(masks, maps, fpr_limit=0.3)` for `masks` $[N, H, W]$ bool and `maps`
# $[N, H, W]$ float. `scipy.ndimage.label` finds connected regions. A loop over the distinct thresholds is fine
# for the small test cases (the package sorts once instead, for millions of pixels).

# %% tags=["solution"]
def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to fpr_limit (MVTec AD)."""
    # BEGIN SOLUTION
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions = []  # (image index, boolean mask of one region)
    for i, m in enumerate(masks):
        labelled, k = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, k + 1)]
    normal = ~masks
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:  # distinct thresholds, highest first
        detected = maps >= t
        fpr.append((detected & normal).sum() / normal.sum())
        pro.append(np.mean([detected[i][r].mean() for i, r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    keep = np.searchsorted(fpr, fpr_limit, side="right")  # points with fpr <= fpr_limit
    area = np.sum(0.5 * (pro[1:keep] + pro[:keep - 1]) * np.diff(fpr[:keep]))
    if fpr[keep - 1] < fpr_limit:  # the piece up to fpr_limit, PRO interpolated there
        pro_at = np.interp(fpr_limit, fpr, pro)
        area += 0.5 * (pro[keep - 1] + pro_at) * (fpr_limit - fpr[keep - 1])
    return float(area / fpr_limit)
    # END SOLUTION


# %%
ok_aupro = check_aupro(aupro)

# %% [markdown]
# ## 3. Pixel AUROC versus AUPRO
#
# Two images: one large defect that the map finds well, and three small defects that it finds badly. Pixel
# AUROC is dominated by the large defect; AUPRO gives the four regions equal weight.

# %%
rng = np.random.default_rng(0)
masks = np.zeros((2, 48, 48), dtype=bool)
masks[0, 8:32, 8:32] = True  # 576 pixels
for r, c in [(5, 5), (20, 30), (38, 12)]:
    masks[1, r:r + 3, c:c + 3] = True  # 9 pixels each
maps = rng.normal(0, 1, masks.shape)
maps[0][masks[0]] += 3.0  # the big defect stands out
maps[1][masks[1]] += 0.5  # the small ones barely
fpr, pro = pro_curve(masks, maps)
print(f"pixel AUROC = {pixel_auroc(masks, maps):.3f}, AUPRO = {package_aupro(masks, maps):.3f}")

fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
axes[0].imshow(maps[0], cmap="inferno")
axes[0].contour(masks[0], [0.5], colors="c")
axes[1].imshow(maps[1], cmap="inferno")
axes[1].contour(masks[1], [0.5], colors="c")
for ax in axes[:2]:
    ax.axis("off")
axes[2].plot(fpr, pro)
axes[2].axvline(0.3, ls="--", c="grey")
axes[2].set(xlabel="FPR", ylabel="PRO", title="PRO curve (area up to 0.3 counts)")
plt.tight_layout()
plt.show()
assert package_aupro(masks, maps) < pixel_auroc(masks, maps) - 0.1
if ok_aupro:
    npt.assert_allclose(aupro(masks, maps), package_aupro(masks, maps), rtol=1e-6)
if ok_auroc:
    npt.assert_allclose(auroc(masks.ravel(), maps.ravel()), pixel_auroc(masks, maps), rtol=1e-9)

# %% [markdown]
# ## 4. Open question: blurring the anomaly maps
#
# Every method blurs its anomaly map with a Gaussian before scoring (PaDiM: `sigma`, in pixels at 256 px).
#
# 1. Write down your prediction first: with **no** blur (`sigma: 0`), and with a strong blur (`sigma: 16`), do
#    pixel AUROC and AUPRO go up or down, and which one moves more?
# 2. In `params.yaml`, under `methods: padim: set:`, change `sigma: 4.0` to `sigma: 16.0`.
# 3. From the repository root run `dvc repro` (only the PaDiM runs and the tables rerun) and `dvc metrics diff`.
# 4. Rerun the cell below. Then try `sigma: 0.0`.
#
# **Question.** Explain the changes in the table with the definitions above: which regions (big or small
# defects) does a strong blur hurt, and why does that matter more for AUPRO? (Set `sigma` back to 4.0.)

# %%
show_params("padim")
results_table("padim")

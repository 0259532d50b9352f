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
# # Lab: the semi-orthogonal embedding
#
# **Learning goals.** After this lab you can
# - draw a random semi-orthogonal matrix $W \in \R^{F \times k}$ ($W^\top W = I_k$) from the QR decomposition
#   of a Gaussian matrix, and explain why the sign fix makes it uniformly (Haar) distributed;
# - compute the Mahalanobis distance of the embedding $W^\top x$ with the projected covariance
#   $(W^\top \Sigma W + \epsilon I)^{-1}$, a $k \times k$ inverse instead of PaDiM's $F \times F$ one;
# - explain why mixing all channels is safer than keeping a random subset of them, and measure the effect of
#   $k$ in the pipeline.
#
# **Expected time:** 45 minutes (10 reading, 25 exercise, 10 open question).
#
# **Before you start:** read the semi-orthogonal section of the chapter *Memory banks* and sections 1-3 of
# *Gaussian features: PaDiM* (or do the PaDiM lab first).

# %%
import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import torch

from vadlab.labs import check_semi_orthogonal, reference, results_table, show_params
from vadlab.methods.semi_orthogonal import semi_orthogonal_matrix as package_matrix
from vadlab.metrics import image_auroc

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# PaDiM models the $F$-dimensional feature vector at every grid position by a Gaussian $\mathcal N(\mu, \Sigma)$
# and needs $\Sigma^{-1}$: $O(F^3)$ per position, and $F^2$ numbers to store. PaDiM keeps a random subset of
# $k$ channels; the semi-orthogonal embedding (Kim et al.) instead maps every feature to
#
# $$ x \mapsto W^\top x \in \R^k, \qquad W \in \R^{F \times k}, \quad W^\top W = I_k . $$
#
# The embedded features have mean $W^\top \mu$ and covariance $W^\top \Sigma W$, so the score is
#
# $$ M(x) = \sqrt{(x - \mu)^\top W \, (W^\top \Sigma W + \epsilon I_k)^{-1} \, W^\top (x - \mu)} , $$
#
# with only a $k \times k$ matrix to invert ($\epsilon$ = `ridge`). A random semi-orthogonal $W$ comes from the
# QR decomposition of a Gaussian matrix $\Omega \in \R^{F \times k}$: $\Omega = QR$ with $Q^\top Q = I_k$.
# $Q$ is unique only up to the signs of its columns (flip column $j$ of $Q$ and row $j$ of $R$); fixing them so
# that $R$ has a positive diagonal, $W = Q \,\mathrm{diag}(\mathrm{sign}(R_{jj}))$, makes $W$ Haar-distributed:
# every $F \times k$ matrix with orthonormal columns is equally likely.
#
# ## 2. Exercise
#
# Write two functions.
#
# - `semi_orthogonal_matrix(n_rows, n_cols, seed)` returns $W$ $[F, k]$ as **float32**. Draw $\Omega$ with
#   `torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)` (the
#   check compares with the package's matrix for the same seed), take `torch.linalg.qr`, fix the signs.
#   Raise `ValueError` unless $1 \le k \le F$.
# - `projected_mahalanobis(x, mean, cov, W, ridge)` for features `x` $[N, F]$, `mean` $[F]$, full covariance
#   `cov` $[F, F]$ and `W` $[F, k]$ returns the distances $M(x)$ $[N]$ of the formula above. Project first,
#   then invert; make sure `x == mean` gives exactly 0, not NaN.

# %% tags=["solution"]
def semi_orthogonal_matrix(n_rows: int, n_cols: int, seed: int = 0) -> torch.Tensor:
    """Random W [n_rows, n_cols] with W^T W = I, Haar-distributed (QR of a Gaussian matrix, signs fixed)."""
    # BEGIN SOLUTION
    if not 1 <= n_cols <= n_rows:
        raise ValueError(f"need 1 <= k <= F, got F={n_rows}, k={n_cols}")
    omega = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(omega)  # reduced QR: q is [F, k]
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0  # a zero diagonal entry has probability 0; keep the column
    return (q * signs).float()  # column j times sign(R_jj)
    # END SOLUTION


def projected_mahalanobis(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, W: torch.Tensor,
                          ridge: float) -> torch.Tensor:
    """Mahalanobis distance [N] of W^T x under N(W^T mean, W^T cov W + ridge I)."""
    # BEGIN SOLUTION
    k = W.shape[1]
    d = (x - mean) @ W  # [N, k]: the embedded differences
    precision = torch.linalg.inv(W.T @ cov @ W + ridge * torch.eye(k, dtype=cov.dtype))  # k x k only
    return torch.einsum("ni,ij,nj->n", d, precision, d).clamp_min(0).sqrt()
    # END SOLUTION


# %% [markdown]
# Run the check. It prints `PASS` for every case, or what differs and on which input.

# %%
ok = check_semi_orthogonal(semi_orthogonal_matrix, projected_mahalanobis)

# %% [markdown]
# ## 3. Why the sign fix?
#
# `torch.linalg.qr` (LAPACK's Householder QR) does not choose the signs at random: it returns
# $R_{11} = -\mathrm{sign}(\Omega_{11}) \lVert \Omega_{:,1} \rVert$, so the first column
# $Q_{:,1} = \Omega_{:,1} / R_{11}$ has $Q_{11} = -|\Omega_{11}| / \lVert \Omega_{:,1} \rVert \le 0$ for
# every seed: not every direction is equally likely. With the fix,
# $W_{:,1} = \Omega_{:,1} / \lVert \Omega_{:,1} \rVert$, a uniformly random unit vector, whose first entry is
# symmetric around 0. The histograms over 2000 seeds ($F = 4$, $k = 2$):

# %%
raw, fixed = [], []
for s in range(2000):
    omega = torch.randn(4, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    raw.append(float(torch.linalg.qr(omega)[0][0, 0]))
    fixed.append(float(package_matrix(4, 2, seed=s)[0, 0]))
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.hist(raw, bins=40, range=(-1, 1), alpha=0.6, label="Q from QR, no sign fix")
ax.hist(fixed, bins=40, range=(-1, 1), alpha=0.6, label="W = Q diag(sign R_jj)")
ax.set_xlabel("W[0, 0] over 2000 seeds")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
assert max(raw) <= 0 and abs(np.mean(fixed)) < 0.05 and np.mean(np.array(fixed) > 0) > 0.45
if ok:
    npt.assert_allclose(semi_orthogonal_matrix(64, 16, 3), package_matrix(64, 16, 3), atol=1e-6)

# %% [markdown]
# ## 4. Against the full-covariance PaDiM distance
#
# Toy features: $F = 64$ channels whose normal variation lives in 8 strong directions (correlated channels, as
# in a CNN), 1000 normal training vectors. The test set has 200 normal vectors and 200 anomalies that shift
# **4 of the 64 channels** (a defect that changes a few feature maps). We compare three scores:
#
# - the full PaDiM distance ($k = F$: `projected_mahalanobis` with $W = I$, an $F \times F$ inverse);
# - the semi-orthogonal embedding with $k = 16$, for 20 draws of $W$;
# - PaDiM's random subset of $k = 16$ channels (a $W$ whose columns are 16 columns of $I$), for 20 draws.

# %%
distance = projected_mahalanobis if ok else reference("semi_orthogonal")[1]  # yours once the check passes
f64 = torch.float64
g = torch.Generator().manual_seed(0)
F, k = 64, 16
A = torch.randn(F, 8, generator=g, dtype=f64)
chol = torch.linalg.cholesky(A @ A.T + 0.05 * torch.eye(F, dtype=f64))
train = torch.randn(1000, F, generator=g, dtype=f64) @ chol.T
shift = torch.zeros(F, dtype=f64)
shift[:4] = 1.0
test = torch.cat([torch.randn(200, F, generator=g, dtype=f64) @ chol.T,
                  torch.randn(200, F, generator=g, dtype=f64) @ chol.T + shift])
labels = np.r_[np.zeros(200), np.ones(200)]
mean, cov = train.mean(0), torch.cov(train.T)

auroc_full = image_auroc(labels, distance(test, mean, cov, torch.eye(F, dtype=f64), 0.01).numpy())
auroc_semi, auroc_subset = [], []
for s in range(20):
    W = package_matrix(F, k, seed=s).double()
    subset = torch.eye(F, dtype=f64)[:, torch.randperm(F, generator=torch.Generator().manual_seed(s))[:k]]
    auroc_semi.append(image_auroc(labels, distance(test, mean, cov, W, 0.01).numpy()))
    auroc_subset.append(image_auroc(labels, distance(test, mean, cov, subset, 0.01).numpy()))

fig, ax = plt.subplots(figsize=(5, 2.8))
ax.scatter(np.zeros(20), auroc_semi, label=f"semi-orthogonal k={k}")
ax.scatter(np.ones(20), auroc_subset, label=f"random channel subset k={k}")
ax.axhline(auroc_full, c="k", ls="--", label=f"full covariance (k = F = {F})")
ax.set_xticks([0, 1], ["semi-orthogonal", "channel subset"])
ax.set_ylabel("image AUROC (20 draws)")
ax.legend(fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()
print(f"full {auroc_full:.3f} | semi-orthogonal mean {np.mean(auroc_semi):.3f}, worst {min(auroc_semi):.3f} | "
      f"subset mean {np.mean(auroc_subset):.3f}, worst {min(auroc_subset):.3f}")
assert max(auroc_semi) <= auroc_full + 0.02  # a k-dimensional view never beats the full model by much
assert min(auroc_semi) > min(auroc_subset) + 0.1 and np.std(auroc_semi) < np.std(auroc_subset)
W = package_matrix(F, F, seed=0).double()  # k = F: a rotation, exactly the full distance
npt.assert_allclose(distance(test, mean, cov, W, 0.01), distance(test, mean, cov, torch.eye(F, dtype=f64), 0.01),
                    rtol=1e-6)

# %% [markdown]
# A random channel subset is all or nothing: a draw that drops the four shifted channels is blind to the defect
# (AUROC near 0.5). Every column of a semi-orthogonal $W$ mixes all 64 channels, so every draw sees part of the
# shift: the mean is a little higher and the worst case much better. With $k = F$, $W$ is a rotation and the
# distance is exactly the full one.
#
# A remark on cost: projecting with the $F \times F$ matrix $W W^\top$ and inverting
# $W W^\top \Sigma W W^\top + \epsilon I$ gives the *same* numbers (try it), because $W W^\top$ is the
# orthogonal projection onto the columns of $W$. It only gives away the saving: an $F \times F$ inverse.
#
# ## 5. Open question: the embedding dimension $k$
#
# The pipeline runs the semi-orthogonal embedding with $k = 100$ of $F = 176$ channels (EfficientNet-Lite0
# blocks 1, 2, 4).
#
# 1. Predict: with $k = 20$, how do fit time, peak memory and the AUROCs change? Use section 4: which kind of
#    defect does a small $k$ miss?
# 2. From the repository root run `dvc exp run -S '+methods.semi_orthogonal.set.k=20'` (or, equivalently, in
#    `params.yaml` change the line to `semi_orthogonal: {image_size: 128, preset: cpu, set: {k: 20}}` and run
#    `dvc repro`; only the semi-orthogonal runs and the tables rerun).
# 3. Compare in `dvc exp show --only-changed` (or `dvc metrics diff`), then rerun the cell below.
#
# **Question.** Compare the loss in pixel AUROC with PaDiM's at `n_features=20` (a random channel subset of the
# same size, exercise 5 of the chapter). Which loses less, and does that agree with section 4? (Restore the
# setting afterwards.)

# %%
show_params("semi_orthogonal")
results_table("semi_orthogonal")

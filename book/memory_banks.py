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
# # Memory banks and low-rank Gaussians
#
# Two methods in this chapter keep *no trained network at all*: they describe the normal training
# patches by a frozen ImageNet backbone and store a summary of those features.
#
# - **PatchCore** {cite:p}`roth2022patchcore` stores the patch features themselves, a *memory bank*,
#   shrunk by a **coreset**, and scores a test patch by its distance to the nearest stored patch (the
#   nearest-neighbour idea of SPADE {cite:p}`cohen2020spade`, made fast).
# - **Semi-orthogonal embedding** {cite:p}`kim2021semiorthogonal` keeps PaDiM's per-position Gaussian
#   ({doc}`padim`) but projects the features with a random **semi-orthogonal** matrix first, so every
#   covariance is small.
#
# Each section states the math, then checks it numerically with `assert`: a wrong derivation
# fails the build.

# %%
import itertools
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods.patchcore import PatchCore, reweighted_score
from vadlab.methods.semi_orthogonal import SemiOrthogonal, semi_orthogonal_matrix
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.coreset import covering_radius, greedy_coreset, jl_min_dim, random_projection
from vadlab.visualize import CMAP, schematic

_ = torch.manual_seed(0)
rng = np.random.default_rng(0)

# %% [markdown]
# ## At a glance
#
# Both methods keep the frozen features of the normal images. PatchCore stores a representative subset of
# the patch features and scores a test patch by its distance to the nearest stored one; semi-orthogonal
# embedding replaces PaDiM's random channel subset by a random semi-orthogonal projection and fits the
# Gaussians in the smaller space.

# %%
fig, axes = plt.subplots(2, 1, figsize=(9, 4.6))
schematic({
    "x": (0, 0, "image $x$", "data"),
    "cnn": (1, 0, "frozen CNN\nlayers 2, 3", "frozen"),
    "patch": (2, 0, "locally aware patch\nfeatures (3×3 average)", "data"),
    "bank": (3, 0, "memory bank $\\mathcal{M}$\ngreedy coreset (1 %)", "statistics"),
    "map": (3, 1, "distance to the nearest\nstored patch: map; max,\nreweighted (Eq. 7): score", "score"),
}, [("x", "cnn"), ("cnn", "patch"), ("patch", "bank", "fit"), ("patch", "map", "test image"), ("bank", "map")],
    title="PatchCore", ax=axes[0])
schematic({
    "x": (0, 0, "image $x$", "data"),
    "cnn": (1, 0, "frozen CNN\nlayers 1–3", "frozen"),
    "proj": (2, 0, "project $W^\\top f$, $W$ random\nsemi-orthogonal $D \\times k$", "data"),
    "gauss": (3, 0, "Gaussian per position\nin $k$ dimensions", "statistics"),
    "map": (3, 1, "low-rank Mahalanobis\ndistance: map and\nimage score", "score"),
}, [("x", "cnn"), ("cnn", "proj"), ("proj", "gauss", "fit"), ("proj", "map", "test image"), ("gauss", "map")],
    title="Semi-orthogonal embedding", ax=axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 1. The coreset objective: minimax facility location
#
# PatchCore's memory bank $\mathcal{M}$ holds every training patch feature: $N = 200 \times 32^2
# \approx 205{,}000$ vectors for 200 images at 256 px.  Searching it for every test patch is slow,
# and most of it is redundant.  The paper keeps a subset $\mathcal{M}_C$ of size $l$ that covers
# $\mathcal{M}$ as well as possible:
#
# $$\mathcal{M}_C^* = \arg\min_{\mathcal{M}_C \subset \mathcal{M},\ |\mathcal{M}_C| = l}\
#   \max_{m \in \mathcal{M}}\ \min_{n \in \mathcal{M}_C} \|m - n\|_2 .$$
#
# The inner quantity $r(\mathcal{M}_C) = \max_m \min_n \|m - n\|$ is the **covering radius**: every
# training patch has a stored patch within $r$.  So a test patch at distance $s$ from the coreset is
# at distance $\ge s - r$ from *every* training patch; the coreset loses at most $r$ of score.
# This is the $k$-center (minimax facility location) problem, NP-hard in general.
#
# **Greedy $k$-center** {cite:p}`gonzalez1985kcenter` starts from any point and repeatedly adds the point farthest
# from the current centres.  It is a **2-approximation**: $r_{\text{greedy}} \le 2\, r^*$.
#
# *Proof.* Let $r = r_{\text{greedy}}$ after $l$ centres and let $p$ be the point attaining it.
# Each centre was, when chosen, the farthest point, at distance $\ge r$ from all earlier centres
# (the radius never grows), so the $l$ centres and $p$ are $l + 1$ points pairwise $\ge r$ apart.
# An optimal solution has only $l$ centres, so two of these $l+1$ points share an optimal centre
# $c$; by the triangle inequality $r \le \|a - b\| \le \|a - c\| + \|c - b\| \le 2 r^*$. $\square$
#
# We check it on small point sets, where the optimum can be found by trying every subset.

# %%
def optimal_radius(points: np.ndarray, k: int) -> float:
    """Exact k-center optimum by brute force over all k-subsets (small sets only)."""
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    return min(d[:, list(s)].min(1).max() for s in itertools.combinations(range(len(points)), k))


ratios = []
for trial in range(40):
    pts = rng.normal(size=(14, 2)) * rng.uniform(0.2, 3, size=2)
    k = int(rng.integers(2, 5))
    greedy = greedy_coreset(torch.from_numpy(pts), k, start=int(rng.integers(14)))
    r_greedy = covering_radius(torch.from_numpy(pts), torch.from_numpy(pts[greedy.numpy()]))
    r_opt = optimal_radius(pts, k)
    ratios.append(r_greedy / r_opt)
ratios = np.array(ratios)
assert (ratios >= 1 - 1e-12).all(), "no subset can beat the optimum"
assert (ratios <= 2 + 1e-12).all(), "greedy k-center must be within a factor 2 of the optimum"
print(f"greedy / optimal covering radius over 40 sets: mean {ratios.mean():.3f}, worst {ratios.max():.3f}")

# %% [markdown]
# `vadlab.nn.coreset.greedy_coreset` returns exactly the greedy sequence (its test compares it
# with a brute-force loop over the full distance matrix).  Here is what greedy selection does on a
# 2-D cloud: it spreads the centres to the rim first, where the rare points are, which is exactly
# what an anomaly detector needs (rare normal patches must stay in the bank).

# %%
cloud = np.concatenate([rng.normal(size=(900, 2)), rng.normal(size=(60, 2)) * 0.4 + [3.5, 2.5]])
sel = greedy_coreset(torch.from_numpy(cloud), 40, start=0).numpy()
rand = rng.choice(len(cloud), 40, replace=False)
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for ax, idx, title in [(axes[0], sel, "greedy coreset (40 points)"), (axes[1], rand, "random subset (40 points)")]:
    r = covering_radius(torch.from_numpy(cloud), torch.from_numpy(cloud[idx]))
    ax.scatter(*cloud.T, s=3, c="lightgray")
    ax.scatter(*cloud[idx].T, s=18, c="tab:red")
    ax.set_title(f"{title}\ncovering radius {r:.2f}")
plt.tight_layout()
plt.show()
assert covering_radius(torch.from_numpy(cloud), torch.from_numpy(cloud[sel])) < \
    covering_radius(torch.from_numpy(cloud), torch.from_numpy(cloud[rand]))

# %% [markdown]
# ## 2. Johnson–Lindenstrauss: selecting in a smaller space
#
# Each greedy step updates the distance of all $N$ points to the new centre: $O(N D)$ work for
# $D$-dimensional features.  PatchCore computes these distances after a random linear map
# $\psi(x) = P^\top x$, $P \in \mathbb{R}^{D \times d}$ with i.i.d. $\mathcal{N}(0, 1/d)$ entries.
# For a fixed vector $v$, $\|P^\top v\|^2 / \|v\|^2$ is a $\chi^2_d / d$ variable: mean 1, standard
# deviation $\sqrt{2/d}$, so the distance ratio has spread $\approx 1/\sqrt{2d}$.  The
# Johnson–Lindenstrauss lemma {cite:p}`johnson1984jl` turns the $\chi^2$ tail bound into a union bound over all pairs:
# $d \ge 4 \ln N / (\eta^2/2 - \eta^3/3)$ keeps *every* pairwise distance within
# $1 \pm \eta$ with positive probability.  PatchCore uses $d = 128$ (official code).

# %%
x = torch.randn(300, 1024, dtype=torch.float64) * torch.linspace(2, 0.1, 1024, dtype=torch.float64)
d0 = torch.pdist(x)
dims = [8, 16, 32, 64, 128, 256]
spreads = []
fig, ax = plt.subplots(figsize=(6, 3.5))
for d in dims:
    ratio = (torch.pdist(x @ random_projection(1024, d, seed=d, dtype=torch.float64)) / d0).numpy()
    spreads.append(ratio.std())
    ax.hist(ratio, bins=80, histtype="step", density=True, label=f"d = {d}")
    assert abs(ratio.mean() - 1) < 0.05  # distances preserved on average
ax.set_xlabel("projected / original distance")
ax.legend()
plt.show()
predicted = 1 / np.sqrt(2 * np.array(dims))
np.testing.assert_allclose(spreads, predicted, rtol=0.25)  # spread ~ 1 / sqrt(2 d)
print("spread of the distance ratio:", np.round(spreads, 3), " predicted 1/sqrt(2d):", np.round(predicted, 3))
print("JL dimension for 205,000 points at eps = 0.5:", jl_min_dim(205_000, 0.5),
      "; at eps = 0.9 (anomalib's setting):", jl_min_dim(205_000, 0.9))

# %% [markdown]
# ## 3. Fast *and* exact greedy selection
#
# The textbook loop costs $N \cdot d$ per selected centre.  vadlab skips, without changing the
# result, every point that provably cannot move closer to the new centre $c'$.  A point $x$ with
# current radius $r(x)$ (distance to its nearest centre $a(x)$) can only change if
# $\|x - c'\| < r(x)$.  Two lower bounds on $\|x - c'\|$ are cheap:
#
# 1. **partial distances.**  Rotate the projected features onto their principal axes (orthogonal:
#    no distance changes).  Then $\sum_{i<h} (x_i - c'_i)^2 \le \|x - c'\|^2$; since the variance
#    is concentrated in the first axes, $h = 8$ of $128$ coordinates already rule out most points.
# 2. **triangle inequality.**  $\|x - c'\| \ge \|c' - a(x)\| - r(x)$, so $\|c' - a(x)\| \ge 2 r(x)$
#    rules $x$ out.
#
# Only the survivors get a full distance.  Below: same sequence, less time (a small synthetic bank;
# the benchmark against anomalib on real patch features is `benchmarks/bench_memory_bank.py`).

# %%
g = torch.Generator().manual_seed(0)
spectrum = torch.exp(-torch.arange(128) / 10.0)  # decaying variance, like projected CNN features
bank = torch.randn(150_000, 128, generator=g) * spectrum * 3
bank += torch.randn(64, 128, generator=g)[torch.randint(0, 64, (150_000,), generator=g)] * spectrum * 6
timings = {}
for prune in (False, True):
    t0 = time.perf_counter()
    seq = greedy_coreset(bank, 600, start=0, prune=prune)
    timings[prune] = (time.perf_counter() - t0, seq)
assert torch.equal(timings[True][1], timings[False][1]), "pruning must not change the greedy sequence"
print(f"600 centres from 150,000 points: plain {timings[False][0]:.2f} s, pruned {timings[True][0]:.2f} s "
      f"({timings[False][0] / timings[True][0]:.1f}x), identical sequence")

# %% [markdown]
# ## 4. PatchCore's image score (paper Eq. 7)
#
# Each test patch $m^{\text{test}}$ scores its distance to the nearest bank item.  The image score
# starts from the worst patch, $s^* = \|m^{\text{test},*} - m^*\|$, and re-weights it by how
# isolated its nearest bank item $m^*$ is:
#
# $$s = \Big(1 - \frac{\exp \|m^{\text{test},*} - m^*\|}{\sum_{m \in \mathcal{N}_b(m^*)} \exp\|m^{\text{test},*} - m\|}\Big)\, s^*,$$
#
# where $\mathcal{N}_b(m^*)$ are the $b$ bank items nearest to $m^*$ ($m^*$ included).  The numerator
# is the term of $m^*$ itself, the *smallest* of the $b$ distances, so the fraction lies in $(0, 1/b]$
# and the weight in $[1 - 1/b, 1)$:
#
# - if $m^*$ sits in a **dense** region, the $b$ distances are nearly equal, the fraction is
#   $\approx 1/b$ and the weight $\approx 1 - 1/b$: the score is damped to $(1 - 1/b)\, s^*$;
# - if $m^*$ is a **lonely** (rare) normal patch, its neighbours lie much farther from the test patch
#   than $m^*$ does, their exponentials dominate the sum, the fraction goes to $0$ and the weight to $1$:
#   the score keeps its full value $s^*$.
#
# So Eq. 7 **raises** the score of a test patch whose nearest normal patch is rare, relative to one whose
# nearest normal patch is typical: being close to a rarely seen normal patch is weaker evidence of
# normality.  The paper leaves $b$ open; we use $b = 9$ like anomalib {cite:p}`akcay2022anomalib`.  The
# official code does not implement Eq. 7 (it uses $s^*$); vadlab follows the paper.  Check both cases,
# with the same distance $s^*$ to the bank:

# %%
cluster = torch.randn(50, 4, dtype=torch.float64) * 0.01  # a dense region of the bank, at the origin
lonely = torch.full((1, 4), 10.0, dtype=torch.float64)  # one rare normal patch, far from the cluster
bank = torch.cat([cluster, lonely])
offset = torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)  # s* = 2 in both cases

near_dense = cluster[:1] + offset  # nearest bank item: a cluster point (dense)
near_lonely = lonely + offset  # nearest bank item: the lonely point
weights = {}
for name, patch in (("dense", near_dense), ("lonely", near_lonely)):
    s_star = torch.cdist(patch, bank).min()
    np.testing.assert_allclose(float(s_star), 2.0, atol=0.05)
    weights[name] = float(reweighted_score(patch, bank, num_neighbors=9) / s_star)
print(f"Eq. 7 weight: dense nearest neighbour {weights['dense']:.4f} (1 - 1/b = {1 - 1 / 9:.4f}), "
      f"lonely nearest neighbour {weights['lonely']:.6f}")
np.testing.assert_allclose(weights["dense"], 1 - 1 / 9, atol=1e-2)  # damped to (1 - 1/b) s*
np.testing.assert_allclose(weights["lonely"], 1.0, atol=1e-6)  # kept at s*: raised relative to dense
assert weights["lonely"] > weights["dense"]

# %% [markdown]
# ## 5. The semi-orthogonal theorem
#
# PaDiM models each position by $\mathcal{N}(\mu, C)$ on $F$ channels and needs $C^{-1}$: $O(F^3)$
# per position.  Embedding with $W \in \mathbb{R}^{F \times k}$, $W^\top W = I_k$, models $W^\top x$
# instead, with covariance $W^\top C W$ and Mahalanobis distance
# $(x-\mu)^\top W (W^\top C W)^{-1} W^\top (x - \mu)$: so $W (W^\top C W)^{-1} W^\top$ plays the role of
# $C^{-1}$ and only a $k \times k$ matrix is inverted.
#
# **Theorem 1 (Kim et al.).**  $\min_W \|C^{-1} - W (W^\top C W)^{-1} W^\top\|_F$ is attained by the
# eigenvectors $U_k$ that carry the $k$ largest eigenvalues **of the precision** $C^{-1}$ (equivalently,
# the $k$ *smallest* eigenvalues of $C$).  For $W = U_S$ spanning eigenvectors $S$ of $C$ (eigenvalues
# $\lambda_i$), $W(W^\top C W)^{-1}W^\top = \sum_{i \in S} \lambda_i^{-1} u_i u_i^\top$, so the error is
# $\sum_{i \notin S} \lambda_i^{-2}$, smallest when the dropped $\lambda_i$ are the largest.  (The
# phrase "top eigenvectors" refers to the precision; with the covariance's top eigenvectors the
# error is the worst of all eigenvector choices, as the check below shows.)
#
# A *random* semi-orthogonal $W$ (QR of a Gaussian matrix, signs fixed so that $R$ has a positive
# diagonal) is data-independent and lands in between; its advantage over PaDiM's random channel
# subset is that it mixes all $F$ channels instead of discarding $F - k$ of them.

# %%
F_, k_ = 40, 8
A = rng.normal(size=(F_, 200))
C = A @ A.T / 200 + 0.05 * np.eye(F_)  # a random covariance
P = np.linalg.inv(C)
lam, U = np.linalg.eigh(C)  # ascending eigenvalues


def embed_error(W: np.ndarray) -> float:
    return float(np.linalg.norm(P - W @ np.linalg.inv(W.T @ C @ W) @ W.T))


err_small = embed_error(U[:, :k_])  # smallest eigenvalues of C = top of the precision
err_large = embed_error(U[:, -k_:])  # top eigenvalues of C
np.testing.assert_allclose(err_small**2, (lam[k_:] ** -2.0).sum(), rtol=1e-8)  # the closed form
err_random = [embed_error(semi_orthogonal_matrix(F_, k_, seed=s).double().numpy()) for s in range(300)]
err_subset = [embed_error(np.eye(F_)[:, rng.choice(F_, k_, replace=False)]) for _ in range(300)]
assert err_small <= min(err_random) and err_small <= min(err_subset)
# local search around the optimum never improves it
for _ in range(200):
    W = np.linalg.qr(U[:, :k_] + 0.05 * rng.normal(size=(F_, k_)))[0]
    assert embed_error(W) >= err_small - 1e-9
W = semi_orthogonal_matrix(F_, k_, seed=0).double().numpy()
np.testing.assert_allclose(W.T @ W, np.eye(k_), atol=1e-6)

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(err_random, bins=30, alpha=0.6, label="random semi-orthogonal W")
ax.hist(err_subset, bins=30, alpha=0.6, label="random channel subset (PaDiM)")
ax.axvline(err_small, c="k", label="U_k: top eigenvectors of the precision")
ax.axvline(err_large, c="tab:red", ls="--", label="top eigenvectors of C")
ax.set_xlabel(r"$\|C^{-1} - W(W^TCW)^{-1}W^T\|_F$")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 6. Both methods on a generated texture
#
# A small, fast run (40 training images of the generated *brick* texture at 128 px; paper
# defaults otherwise: PatchCore with a 10 % coreset, $p = 3$, $b = 9$; semi-orthogonal with
# $k = 100$).  Full-size results on all generated categories come from the DVC pipeline.

# %%
root = generate(Path(tempfile.gettempdir()) / "vadlab_memory_banks", seed=0, categories=["brick"], n_train=40, n_test=24, size=128)
train = make_loader(MVTecDataset(root, "brick", "train", 128), batch_size=8)
test = next(iter(make_loader(MVTecDataset(root, "brick", "test", 128), batch_size=24)))
results, models = {}, {}
for name, model in [("PatchCore", PatchCore()), ("semi-orthogonal", SemiOrthogonal())]:
    t0 = time.perf_counter()
    model.fit(train)
    models[name] = model
    scores, maps = model.predict(test["image"])
    results[name] = maps
    print(f"{name:16s} fit+predict {time.perf_counter() - t0:5.1f} s   image AUROC "
          f"{image_auroc(test['label'].numpy(), scores.numpy()):.3f}   pixel AUROC "
          f"{pixel_auroc(test['mask'][:, 0].numpy(), maps.numpy()):.3f}")

defective = [i for i in range(24) if test["label"][i] == 1][:4]
scale = {name: np.percentile(maps[defective].numpy(), [1, 99.9]) for name, maps in results.items()}  # per method
fig, axes = plt.subplots(4, 4, figsize=(8, 8))
for col, i in enumerate(defective):
    axes[0, col].imshow(test["image"][i].permute(1, 2, 0))
    axes[1, col].imshow(test["mask"][i, 0], cmap="gray")
    for row, name in ((2, "PatchCore"), (3, "semi-orthogonal")):
        shown = axes[row, col].imshow(results[name][i], cmap=CMAP, vmin=scale[name][0], vmax=scale[name][1])
        if col == len(defective) - 1:
            fig.colorbar(shown, ax=axes[row, :].tolist(), fraction=0.02, pad=0.01, label="score")
for row, label in enumerate(["image", "ground truth", "PatchCore", "semi-orthogonal"]):
    axes[row, 0].set_ylabel(label)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the PatchCore map measures.** The map at a patch is the distance from its feature to the
# nearest feature of the memory bank, and the bank's rows are patches of the training images (the
# coreset *selects* rows, it never averages them). So every value of the map points at one patch of one
# normal training image: the most similar normal patch there is. Take the first defective image of the
# figure, the patch inside its defect with the largest distance, and a patch far from the defect: for each,
# the nearest row of the bank (checked against a brute-force search) and where it comes from.

# %%
from vadlab.backbones import upsample_to
from vadlab.nn.coreset import nearest_neighbours
from vadlab.nn.filters import gaussian_blur, sigma_for

patchcore = models["PatchCore"]
bank = patchcore.memory_bank
i_def = defective[0]
feats = patchcore.embed(test["image"][i_def:i_def + 1])  # [1, D, h, w]
_, dim, h_grid, w_grid = feats.shape
queries = feats[0].permute(1, 2, 0).reshape(-1, dim)
nn_dist, nn_index = (v[:, 0] for v in nearest_neighbours(queries, bank, k=1))
brute = torch.cdist(queries.double(), bank.double())  # the definition: distance to every bank row
torch.testing.assert_close(nn_dist.double(), brute.min(1).values, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(brute[torch.arange(len(queries)), nn_index], brute.min(1).values, rtol=1e-4, atol=1e-4)
# the map PatchCore returned is this distance, upsampled and smoothed
rebuilt = gaussian_blur(upsample_to(nn_dist.reshape(1, h_grid, w_grid), (128, 128)), sigma_for(patchcore.config.sigma, 128))
torch.testing.assert_close(rebuilt[0], results["PatchCore"][i_def], rtol=1e-4, atol=1e-4)

cell_px = 128 // h_grid  # pixels per grid cell
on_defect = torch.nn.functional.adaptive_max_pool2d(test["mask"][i_def:i_def + 1].float(), (h_grid, w_grid))[0, 0] > 0
far = torch.nn.functional.max_pool2d(on_defect[None, None].float(), 7, stride=1, padding=3)[0, 0] == 0
dist_grid = nn_dist.reshape(h_grid, w_grid)
defect_cell = int(torch.where(on_defect.flatten(), nn_dist, -torch.inf).argmax())
far_cells = torch.nonzero(far.flatten())[:, 0]
normal_cell = int(far_cells[nn_dist[far_cells].argsort()[len(far_cells) // 2]])  # a typical distance, far away

# where the nearest bank rows come from: the training patch with the identical feature
train_feats = torch.cat([patchcore.embed(batch["image"]).permute(0, 2, 3, 1).reshape(-1, dim) for batch in train])
origin = {}
for name, cell in (("defect", defect_cell), ("normal", normal_cell)):
    gap, row = torch.cdist(bank[nn_index[cell]][None], train_feats)[0].min(0)
    # the bank row is a training patch, copied unchanged (up to float rounding of the features)
    assert float(gap) < 1e-3 * float(bank[nn_index[cell]].norm())
    image_no, rest = divmod(int(row), h_grid * w_grid)
    origin[name] = (image_no, *divmod(rest, w_grid))
    print(f"{name} patch at grid cell {divmod(cell, w_grid)}: distance to the nearest bank patch "
          f"{float(nn_dist[cell]):.3f}; that patch is cell {origin[name][1:]} of training image {image_no}")
normal_images_in_batch = [i for i in range(len(test["label"])) if test["label"][i] == 0]
normal_max = float(results["PatchCore"][normal_images_in_batch].amax())
print(f"smoothed map: defect patch's image max {float(results['PatchCore'][i_def].amax()):.3f}, "
      f"largest value on the {len(normal_images_in_batch)} normal test images {normal_max:.3f}")
assert float(nn_dist[defect_cell]) > 1.5 * float(nn_dist[normal_cell])
assert float(results["PatchCore"][i_def].amax()) > normal_max

train_images = torch.cat([batch["image"] for batch in train])


def crop(image: torch.Tensor, r: int, c: int) -> np.ndarray:
    """The 3 x 3 cells around grid cell (r, c): the neighbourhood the patch feature aggregates."""
    top, left = max(0, (r - 1) * cell_px), max(0, (c - 1) * cell_px)
    return image[:, top:top + 3 * cell_px, left:left + 3 * cell_px].permute(1, 2, 0).numpy()


fig, axes = plt.subplots(1, 6, figsize=(13, 2.6))
axes[0].imshow(test["image"][i_def].permute(1, 2, 0))
axes[0].set_title("test image", fontsize=9)
im = axes[1].imshow(dist_grid, cmap="magma")
axes[1].set_title("distance to nearest bank patch", fontsize=9)
fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
for (name, cell), colour in zip((("defect", defect_cell), ("normal", normal_cell)), ("red", "lime")):
    r, c = divmod(cell, w_grid)
    axes[0].add_patch(plt.Rectangle(((c - 1) * cell_px, (r - 1) * cell_px), 3 * cell_px, 3 * cell_px, fill=False,
                                    ec=colour, lw=1.5))
    axes[1].plot(c, r, "s", mfc="none", mec=colour, ms=8)
for j, (name, cell) in enumerate((("defect", defect_cell), ("normal", normal_cell))):
    image_no, r0, c0 = origin[name]
    axes[2 + 2 * j].imshow(crop(test["image"][i_def], *divmod(cell, w_grid)))
    axes[2 + 2 * j].set_title(f"{name} patch (d = {float(nn_dist[cell]):.2f})", fontsize=9)
    axes[3 + 2 * j].imshow(crop(train_images[image_no], r0, c0))
    axes[3 + 2 * j].set_title(f"its nearest: training image {image_no}", fontsize=9)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# The normal patch finds a close match: the training images hold patches of the same brick texture. The
# defect patch also gets a nearest neighbour, because there always is one, but it is much farther away:
# no training image contains the defect, so the best the bank offers is a normal patch that merely looks
# most like it. That distance is the anomaly score, and it is large exactly where the image holds
# something the training set never showed. On this batch the maximum of the defective image's map is
# above every value of the normal test images' maps (both printed above).

# %% [markdown]
# ## 7. Speed and accuracy: coreset size, and vadlab against anomalib
#
# **A live sweep.**  The coreset ratio trades fit time (more centres to select, a bigger bank to
# search) against accuracy.  On the small run above (40 images, 128 px, so $N = 10{,}240$ patches):

# %%
import json

from IPython.display import Markdown, display

sweep = []
for ratio in (0.01, 0.05, 0.25):
    t0 = time.perf_counter()
    pc = PatchCore(coreset_ratio=ratio).fit(train)
    fit_s = time.perf_counter() - t0
    s, _ = pc.predict(test["image"])
    sweep.append((ratio, len(pc.memory_bank), fit_s, image_auroc(test["label"].numpy(), s.numpy())))
    print(f"coreset {ratio:4.0%}: {sweep[-1][1]:5d} centres, fit {fit_s:5.2f} s, image AUROC {sweep[-1][3]:.3f}")
assert [row[1] for row in sweep] == [int(r * 40 * 16 * 16) for r, *_ in sweep]

# %% [markdown]
# **The benchmark.**  `benchmarks/bench_memory_bank.py` runs vadlab's and anomalib 2.7's
# {cite:p}`akcay2022anomalib` PatchCore and PaDiM on the same generated images, the same EfficientNet-Lite0
# weights and layers and the same 1 % coreset, each (library, seed) in a fresh process, several seeds
# each (anomalib's randomness is seeded through torch's and numpy's global generators), with both
# libraries imported before the clocks start. Its numbers are committed in
# `benchmarks/results/memory_bank.json`; the cell below prints the command, the setting and the machine,
# and writes its sentences from that file. Where vadlab's PatchCore fits faster, the reason is section 3:
# the greedy sequence is the same, the pruning bounds skip most distance updates. PaDiM's peak memory
# is low because `PositionalGaussian.finalize` works through the positions in chunks, so only the sums
# and the float32 precisions are ever held for all positions at once. Timings depend on the machine's
# load (`memory_bank_128px_loaded.*` is a run on a loaded machine): compare libraries within a run, never
# across runs.

# %%
bench_path = Path("..") / "benchmarks" / "results" / "memory_bank.json"
if not bench_path.is_file():
    print(f"{bench_path} is missing: run the command in benchmarks/bench_memory_bank.py to produce it")
else:
    bench = json.loads(bench_path.read_text())
    print("command:", bench["command"])
    print("setting:", bench.get("setting"))
    print("machine:", bench["machine"])
    sentences = []
    for method in ("patchcore", "padim"):
        summary = bench.get("summary", {}).get(method, {})
        if not {"vadlab", "anomalib"} <= set(summary):
            continue
        v, a = summary["vadlab"]["mean"], summary["anomalib"]["mean"]
        runs = len(bench["runs"][method]["vadlab"])
        sentences.append(
            f"- **{method}** (mean of {runs} seeds): fit {v['fit_s']:.1f} s (vadlab) against {a['fit_s']:.1f} s "
            f"(anomalib), inference {v['infer_ms']:.0f} against {a['infer_ms']:.0f} ms per image, peak memory "
            f"{v['peak_mb']:.0f} against {a['peak_mb']:.0f} MB, image AUROC {v['image_auroc']:.3f} against "
            f"{a['image_auroc']:.3f}, pixel AUROC {v['pixel_auroc']:.3f} against {a['pixel_auroc']:.3f}.")
    display(Markdown("\n".join(sentences)))
    methods = [m for m in ("patchcore", "padim") if m in bench.get("summary", {})
               and {"vadlab", "anomalib"} <= set(bench["summary"][m])]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, marker in zip(methods, "os"):
        for lib, colour in (("vadlab", "C0"), ("anomalib", "C3")):
            runs = bench["runs"][method][lib]
            axes[0].scatter([r["fit_s"] for r in runs], [r["image_auroc"] for r in runs], c=colour,
                            marker=marker, label=f"{method} {lib}")
            axes[1].scatter([r["infer_ms"] for r in runs], [r["pixel_auroc"] for r in runs], c=colour,
                            marker=marker)
        ratio = bench["summary"][method]["anomalib_over_vadlab"]
        print(f"{method}: anomalib time / vadlab time: fit {ratio['fit']:.1f}x, inference {ratio['inference']:.1f}x; "
              f"image AUROC vadlab - anomalib {ratio['image_auroc_points']:+.1f} points (means over seeds)")
    axes[0].set(xscale="log", xlabel="fit time (s, log)", ylabel="image AUROC")
    axes[1].set(xlabel="inference (ms / image)", ylabel="pixel AUROC")
    axes[0].legend(fontsize=7)
    fig.suptitle("one point per seed")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# **Lower precision for the frozen backbone.** Every method here spends most of its inference in the
# backbone (`benchmarks/bench_floor.py` measures that share). A frozen network runs in the channels-last
# memory layout (the same float32 arithmetic), and `backbone_precision="bfloat16"` (PaDiM,
# semi-orthogonal, PatchCore, CFLOW) runs it under bfloat16 autocast: 8 mantissa bits instead of 23, so
# the features move by a few per cent. Whether that changes a ranking is an empirical question;
# `benchmarks/bench_precision.py` fits each method twice on every generated category, once per
# precision, and the cell below reads its committed result.

# %%
precision_path = Path("..") / "benchmarks" / "results" / "precision.json"
if not precision_path.is_file():
    print(f"{precision_path} is missing: run benchmarks/bench_precision.py --out benchmarks/results/precision")
else:
    prec = json.loads(precision_path.read_text())
    speed = prec["backbone_ms_per_image_256px"]
    print("machine:", prec["machine"])
    table = pd.DataFrame({m: {"float32": s["float32_image_auroc"], "bfloat16": s["bfloat16_image_auroc"],
                              "image AUROC points": s["image_auroc_points"],
                              "pixel AUROC points": s["pixel_auroc_points"]}
                          for m, s in prec["summary"].items()}).T
    display(table.round(4))
    worst = {m: max(abs(r["image_auroc_points"]) for r in prec["runs"] if r["method"] == m) for m in prec["summary"]}
    display(Markdown(
        f"The bfloat16 backbone takes {speed['bfloat16']:.1f} ms per 256-px image against "
        f"{speed['float32']:.1f} ms in float32 ({speed['float32'] / speed['bfloat16']:.2f}x) on this machine, "
        "whose CPU has native bfloat16 instructions (without them autocast emulates bfloat16 and is slower). "
        "Mean image AUROC changes by " + ", ".join(f"{s['image_auroc_points']:+.2f} points for {m}"
                                                  for m, s in prec["summary"].items())
        + "; the largest change on one category is " + ", ".join(f"{worst[m]:.2f} ({m})" for m in worst)
        + ". The default stays float32: the speed-up depends on the hardware, and a nearest-neighbour score "
        "(PatchCore) moves by more than a density does on single categories."))

# %% [markdown]
# Results on the generated dataset: see the Results chapter, {doc}`results`.
#
# ## Published numbers and departures
#
# **PatchCore** {cite:p}`roth2022patchcore` (MVTec AD, WRN-50, image / pixel AUROC / PRO): 25 % coreset
# 99.1 / 98.1 / 93.4, 10 % 99.0 / 98.1 / 93.5, 1 % 99.0 / 98.0 / 93.1.  **Semi-orthogonal**
# {cite:p}`kim2021semiorthogonal` (official README, `jnhwkim/orthoad`, MVTec AD): PRO 94.2, pixel AUROC
# 98.2 (PaDiM in the same table: 92.1 / 97.9); no image AUROC reported.
#
# Departures in vadlab, and why:
#
# - backbone EfficientNet-Lite0 (weights available offline) instead of WRN-50 / ResNet-18: PatchCore
#   uses blocks 2 and 4 (strides 8 and 16, like layer2 and layer3), semi-orthogonal blocks 1, 2, 4;
#   $F = 176$, $k = 100$;
# - no 256 → 224 centre crop, so border defects count;
# - PatchCore's image score is the paper's Eq. 7 (the official code takes the maximum), $b = 9$;
# - PatchCore's neighbourhood average zero-pads the border as the official unfold does; the
#   concatenated 152 channels are below the 1024 target, so no channel pooling happens;
# - the coreset starts from a seeded random patch that is part of the coreset; the selection is the
#   exact greedy sequence, computed with exact pruning bounds (section 3) rather than approximately;
# - semi-orthogonal covariances divide by $N - 1$ like PaDiM (the official code divides by $N$).
#
# ## Summary
#
# - **PatchCore** keeps a coreset of the normal patch features and scores a test patch by its distance to
#   the nearest one; greedy $k$-center selection is a 2-approximation of the minimax coreset, and a random
#   projection (Johnson–Lindenstrauss) makes the selection cheap without changing what it preserves.
# - Its image score, Eq. 7, multiplies the worst patch distance $s^*$ by a weight in $[1 - 1/b, 1)$: near
#   $1 - 1/b$ when the nearest normal patch is typical, near $1$ when it is rare.
# - PatchCore does not need aligned images (any training patch can match any test patch); its cost is the
#   bank's memory and the nearest-neighbour search at test time.
# - The **semi-orthogonal embedding** keeps PaDiM's per-position Gaussian but inverts a $k \times k$
#   matrix: the best embedding keeps the top eigenvectors of the *precision*; a random semi-orthogonal $W$
#   mixes all channels instead of discarding most of them.
#
# ## Exercises
#
# 1. *(numerical)* Using `jl_min_dim`, how many projection dimensions does the Johnson–Lindenstrauss
#    bound ask for to keep all pairwise distances of 10,000 and of 1,000,000 patches within
#    $1 \pm 0.1$? Why does PatchCore get away with 128?
# 2. *(conceptual)* Eq. 7 never lets the weight leave $[1 - 1/b, 1)$. For $b = 9$, how much can it change
#    the ranking of two test images whose $s^*$ differ by 5 %? When is the re-weighting worth its cost?
# 3. *(numerical)* Construct a 2-D point set on which greedy $k$-center with $k = 2$ attains exactly twice
#    the optimal covering radius (the bound of section 1 is tight), and check it with `optimal_radius`.
# 4. *(pipeline)* Run `dvc exp run -S '+methods.patchcore.set.coreset_ratio=0.01'` and
#    `dvc exp run -S '+methods.patchcore.set.coreset_ratio=0.25'`, then `dvc exp show --only-changed`:
#    how do `fit_seconds`, `predict_seconds_per_image` and the AUROCs move against the committed run?
# 5. *(pipeline)* Run `dvc exp run -S '+methods.semi_orthogonal.set.k=20'`. Compare its pixel AUROC in
#    `dvc exp show` with PaDiM's at `n_features=20` (exercise 5 of {doc}`padim`).
#
# The lab of this chapter, {download}`labs/lab_patchcore.py` (see {doc}`course_labs`), has you implement
# greedy $k$-center selection.
# Its second lab, {download}`labs/lab_semi_orthogonal.py`, has you implement the random semi-orthogonal matrix
# and the projected Mahalanobis distance.

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
# # Lab: greedy k-center coreset selection (PatchCore)
#
# **Learning goals.** After this lab you can
# - implement the greedy farthest-point rule that picks PatchCore's memory bank, in $O(N \cdot l)$ distance
#   evaluations with one running minimum per point;
# - explain why it covers the training patches better than a random subset of the same size (the covering
#   radius), including rare patches;
# - measure the trade-off between bank size, speed and accuracy in the pipeline.
#
# **Expected time:** 40 minutes (10 reading, 20 exercise, 10 open question).
#
# **Before you start:** read the coreset section of the chapter *Memory banks*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_greedy_coreset, results_table, show_params
from vadlab.nn.coreset import covering_radius, greedy_coreset as package_coreset

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# PatchCore keeps a subset $\mathcal M_C$ of $l$ of the $N$ training patch features $\mathcal M$ that covers
# them as well as possible, i.e. minimises the covering radius
# $\max_{m \in \mathcal M} \min_{c \in \mathcal M_C} \lVert m - c \rVert$ (the k-center problem). The greedy
# rule is a 2-approximation:
#
# 1. start with one centre (row `start`);
# 2. repeat until there are $l$ centres: add the point **farthest from its nearest centre**,
#    $c_{\text{new}} = \argmax_{m} \min_{c \in \mathcal M_C} \lVert m - c \rVert$.
#
# Keep one number per point, $r(m) = \min_{c} \lVert m - c \rVert$; after adding a centre, only the distances
# to the new centre are needed to update it.
#
# ## 2. Exercise
#
# Write `greedy_coreset(features, n_select, start=0)` for `features` $[N, d]$; return the chosen row indices
# (a long tensor of length `n_select`, in the order they were chosen). Ties go to the lowest index
# (`torch.argmax` does that).

# %% tags=["solution"]
def greedy_coreset(features: torch.Tensor, n_select: int, start: int = 0) -> torch.Tensor:
    """Indices of n_select rows of features [N, d] chosen by greedy farthest-point selection."""
    # BEGIN SOLUTION
    chosen = [start]
    nearest = (features - features[start]).norm(dim=1)  # r(m): distance to the nearest centre
    while len(chosen) < n_select:
        new = int(torch.argmax(nearest))
        chosen.append(new)
        nearest = torch.minimum(nearest, (features - features[new]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long)
    # END SOLUTION


# %%
ok = check_greedy_coreset(greedy_coreset)

# %% [markdown]
# ## 3. Coreset versus random subset
#
# 2-D "patch features": a dense blob of common patches and a few rare ones far away. Both subsets keep 15 of
# 400 points; the covering radius is the distance from the worst-covered point to its nearest kept point.

# %%
g = torch.Generator().manual_seed(0)
common = torch.randn(380, 2, generator=g)
rare = torch.randn(20, 2, generator=g) * 0.3 + torch.tensor([6.0, 4.0])
points = torch.cat([common, rare])
core = package_coreset(points, 15, start=0)
rand = torch.randperm(len(points), generator=g)[:15]
r_core, r_rand = covering_radius(points, points[core]), covering_radius(points, points[rand])

fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharex=True, sharey=True)
for ax, idx, r, title in zip(axes, (core, rand), (r_core, r_rand), ("greedy coreset", "random subset")):
    ax.scatter(*points.T, s=4, c="lightgrey")
    ax.scatter(*points[idx].T, s=25, c="crimson")
    ax.set_title(f"{title}: covering radius {r:.2f}")
    ax.set_aspect("equal")
plt.tight_layout()
plt.show()
assert r_core < r_rand
if ok:
    assert torch.equal(greedy_coreset(points, 15, 0), core)

# %% [markdown]
# The coreset always keeps a few of the rare patches: at test time such a patch finds a close neighbour in the
# bank and is not flagged as anomalous. A random subset may drop them all.
#
# ## 4. Open question: the size of the memory bank
#
# The pipeline runs PatchCore with its CPU preset (`coreset_ratio: 0.01`, 1 % of the patches).
#
# 1. Predict: with 10 times fewer patches in the bank (`0.001`), how do fit time, predict time and the metrics
#    change? And with 10 times more (`0.1`)?
# 2. In `params.yaml` change the PatchCore line to
#    `patchcore: {image_size: 128, preset: cpu, set: {coreset_ratio: 0.001}}`.
# 3. From the repository root run `dvc repro` (only the PatchCore runs and the tables rerun) and
#    `dvc metrics diff`.
# 4. Rerun the cell below.
#
# **Question.** Which categories lose most, textures or objects, and why? Use the covering radius of section 3
# to explain. (Restore the line afterwards.)

# %%
show_params("patchcore")
results_table("patchcore")

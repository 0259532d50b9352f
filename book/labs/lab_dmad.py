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
# # Lab: vector quantisation and the straight-through gradient (DMAD)
#
# **Learning goals.** After this lab you can
# - quantise a feature cube $[B, D, H, W]$ to its nearest memory items;
# - write the compression loss with the stop-gradients on the right sides, and say which term trains what;
# - pass a gradient through the non-differentiable argmin with the straight-through estimator, and check
#   gradients with autograd;
# - relate the size of DMAD's memory to its results in the pipeline.
#
# **Expected time:** 45 minutes (10 reading, 25 exercise, 10 open question).
#
# **Before you start:** read the memory (vector quantisation) section of the chapter *DMAD*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_quantize, results_table, show_params
from vadlab.nn.vq import VectorQuantizer

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# DMAD's encoder gives a cube $z_e \in \R^{B \times D \times H \times W}$; every $D$-vector is replaced by the
# nearest of $N$ memory items $z_n$:
#
# $$ z_q = z_{k^*}, \qquad k^* = \argmin_n \lVert z_e - z_n \rVert_2 . $$
#
# The argmin has no useful gradient. Two tricks make the system trainable ($\SG$ = stop-gradient, `.detach()`):
#
# - the **compression loss** $L_{com} = \lVert \SG(z_e) - z_q \rVert^2 + \beta \lVert z_e - \SG(z_q) \rVert^2$
#   (means over all entries): the first term pulls the memory items towards the encoder's outputs, the second
#   ("commitment") keeps the encoder close to the memory;
# - the **straight-through** output $z_{st} = z_e + \SG(z_q - z_e)$: its value is $z_q$, its gradient with
#   respect to $z_e$ is the identity, so the decoder's gradient reaches the encoder unchanged.
#
# ## 2. Exercise
#
# Write `quantize(z_e, memory, beta)` for `z_e` $[B, D, H, W]$ and `memory` $[N, D]$. Return
# `(z_st, loss, indices)`: the straight-through cube $[B, D, H, W]$, the scalar loss $L_{com}$, and the chosen
# item per position $[B, H, W]$ (ties: the lowest index). The check compares values **and** the gradients of
# `(z_st * G).sum() + loss` with respect to `z_e` and `memory`.

# %% tags=["solution"]
def quantize(z_e: torch.Tensor, memory: torch.Tensor, beta: float):
    """Nearest-item quantisation with compression loss and straight-through output."""
    # BEGIN SOLUTION
    b, d, h, w = z_e.shape
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # one D-vector per position
    indices = torch.cdist(flat.detach(), memory.detach()).argmin(1).view(b, h, w)
    z_q = memory[indices].permute(0, 3, 1, 2)  # back to [B, D, H, W]
    loss = ((z_e.detach() - z_q) ** 2).mean() + beta * ((z_e - z_q.detach()) ** 2).mean()
    z_st = z_e + (z_q - z_e).detach()
    return z_st, loss, indices
    # END SOLUTION


# %%
ok = check_quantize(quantize)

# %% [markdown]
# ## 3. Training the memory alone
#
# Only the first loss term moves the memory. Here the "encoder outputs" are fixed 2-D points from four
# clusters; minimising $L_{com}$ over the memory alone moves each used item to the mean of the points that
# choose it, as in k-means. The package's `VectorQuantizer` is used.

# %%
g = torch.Generator().manual_seed(0)
centres = torch.tensor([[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]])
points = (centres[torch.randint(0, 4, (400,), generator=g)] + 0.4 * torch.randn(400, 2, generator=g))
z_e = points.T.reshape(1, 2, 20, 20)  # a [1, D=2, 20, 20] cube
vq = VectorQuantizer(n_items=6, dim=2, beta=0.25)
with torch.no_grad():
    vq.memory.copy_(torch.randn(6, 2, generator=g) * 0.5)  # start near the origin
start = vq.memory.detach().clone()
opt = torch.optim.Adam(vq.parameters(), lr=0.05)
for step in range(300):
    opt.zero_grad()
    vq(z_e).loss.backward()
    opt.step()
end = vq.memory.detach()

plt.figure(figsize=(4, 4))
plt.scatter(*points.T, s=4, c="lightgrey")
plt.scatter(*start.T, marker="x", c="grey", label="memory at start")
plt.scatter(*end.T, marker="*", s=120, c="crimson", label="after 300 steps")
plt.legend(loc="upper center", fontsize=8)
plt.gca().set_aspect("equal")
plt.show()
used = vq(z_e).indices.unique()
assert (torch.cdist(end[used], centres).min(1).values < 0.5).all()  # used items sit at cluster means
if ok:
    z_st, loss, idx = quantize(z_e, vq.memory.detach(), 0.25)
    ref = vq(z_e)
    npt.assert_allclose(z_st, ref.z_q.detach(), atol=1e-6)
    assert torch.equal(idx, ref.indices)

# %% [markdown]
# Items that no point chooses get no gradient at all ("dead" items): the package initialises the memory from
# random encoder outputs (`VectorQuantizer.init_from`) to avoid them.
#
# ## 4. Open question: the size of the memory
#
# DMAD quantises its encoder's output with `n_memory` items (200 in the paper). The memory is an information
# bottleneck: the decoder can only rebuild what the items can express.
#
# 1. Predict: with only 4 items, does the reconstruction of normal images get worse? And of defects? What does
#    that do to the anomaly scores?
# 2. In `params.yaml` change the DMAD line to `dmad: {image_size: 64, preset: cpu, set: {n_memory: 4}}`.
# 3. From the repository root run `dvc repro` (the DMAD runs and the tables rerun) and `dvc metrics diff`.
# 4. Rerun the cell below; then try `n_memory: 2000`.
#
# **Question.** Explain the changes with the bottleneck argument: where is the sweet spot between "too small to
# rebuild normal images" and "large enough to rebuild defects too"? (Restore the line afterwards.)

# %%
show_params("dmad")
results_table("dmad")

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
# # Lab: vector quantisation, and deformation versus residual (DMAD)
#
# **Learning goals.** After this lab you can
# - quantise a feature cube $[B, D, H, W]$ to its nearest memory items;
# - write the compression loss with the stop-gradients on the right sides, and say which term trains what;
# - pass a gradient through the non-differentiable argmin with the straight-through estimator, and check
#   gradients with autograd;
# - write DMAD's score from its two measured parts, the residual $A_{rec}$ and the deformation $A_{df}$, and
#   show on a controlled example that a pose change lands in the deformation term and a scratch in the residual;
# - relate the size of DMAD's memory to its results in the pipeline.
#
# **Expected time:** 65 minutes (15 reading, 25 + 15 exercises, 10 open question).
#
# **Before you start:** read the memory (vector quantisation) section of the chapter *DMAD*, and its section
# "Deformation or residual: a controlled example".

# %%
import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import pandas as pd
import torch

from vadlab.data import render_sample
from vadlab.labs import check_dmad_score, check_quantize, reference, results_table, show_params
from vadlab.nn import warp as W
from vadlab.nn.filters import gaussian_blur, sigma_for
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
# ## 4. Recap: what the reconstruction must explain, split in two
#
# DMAD's reconstruction $\hat x$ is a prototype drawn from the memory and then bent onto the input by the
# pyramid deformation module: $K$ smooth, bounded offset fields $O_1, \dots, O_K$ (two channels
# $(\Delta x, \Delta y)$ per pixel, in pixels of the image). Both parts are *measured* at test time:
#
# - the **residual** $A_{rec}(p) = \frac{1}{3} \sum_{c} (x_c(p) - \hat x_c(p))^2$, DMAD's squared error averaged
#   over the colour channels: what the deformed prototype still fails to match;
# - the **deformation** $A_{df}(p) = \sum_k \lVert O_k(p) \rVert_2$, the summed Euclidean lengths of the
#   fields at $p$: how far the prototype had to be moved there (in pixels).
#
# Both maps are smoothed with a Gaussian $k$, and the image score adds the two maxima,
#
# $$ s = \max_p (A_{rec} * k)(p) + \alpha \max_p (A_{df} * k)(p). $$
#
# A pose change is cheap to explain by moving pixels: it lands in $A_{df}$, weighted by a small $\alpha$. A
# scratch cannot be drawn by moving prototype pixels around: it stays in $A_{rec}$. (`DMAD.predict` also
# divides each smoothed term by its mean maximum on the training images, so that $\alpha$ weighs two unit-free
# numbers; with `normalize=False` it is exactly the formula above.)
#
# ## 5. Exercise: the score
#
# Write `dmad_score(x, reconstruction, fields, alpha, blur)`: `x` and `reconstruction` are $[B, 3, H, W]$,
# `fields` a list of $K$ fields $[B, 2, H, W]$ (pixels), `blur` a function that smooths maps $[B, H, W]$ (the
# Gaussian $k$). Return `(a_rec, a_df, scores)`: the **smoothed** maps $A_{rec} * k$ and $A_{df} * k$, each
# $[B, H, W]$, and the score per image $[B]$.

# %% tags=["solution"]
def dmad_score(x: torch.Tensor, reconstruction: torch.Tensor, fields: list[torch.Tensor], alpha: float, blur):
    """DMAD's residual and deformation maps (smoothed) and image score max A_rec + alpha max A_df."""
    # BEGIN SOLUTION
    a_rec = blur((x - reconstruction).pow(2).mean(1))
    a_df = blur(sum(field.pow(2).sum(1).sqrt() for field in fields))
    scores = a_rec.flatten(1).amax(1) + alpha * a_df.flatten(1).amax(1)
    return a_rec, a_df, scores
    # END SOLUTION


# %%
ok_score = check_dmad_score(dmad_score)

# %% [markdown]
# ## 6. Deformation or residual: a controlled example
#
# The chapter's experiment with your score (the package's until your check passes). A normal washer is the
# prototype $P$; the inputs are $P$ itself, $P$ moved by $(3, 2)$ px (a pose change) and $P$ with a bright
# scratch. For each, the smoothest bounded field that warps $P$ onto the input is fitted, the PDM's job
# without its network: $O = 4\tanh(\mathrm{up}(\theta))$ from an $8 \times 8$ grid $\theta$ (at most 4 px,
# smooth by construction), minimising $\lVert P \odot O - x \rVert^2 + 10^{-3} \lVert \nabla O \rVert_1$. The
# reconstruction is $\hat x = P \odot O$. For comparison, the column "no deformation" scores the residual
# against the prototype itself (a plain reconstruction model). The terms are raw (not normalised), so
# $\alpha = 0.01$: a move of 1 px costs as much as a residual of 0.01. (About 2 s.)

# %%
score_fn = dmad_score if ok_score else reference("dmad_score")  # yours once the check passes
S = 64
clean, _, _ = render_sample("washer", None, seed=0, split="train", index=0, size=S)
prototype = torch.from_numpy(clean).permute(2, 0, 1).float()[None] / 255  # [1, 3, 64, 64] in [0, 1]
pose_field = torch.zeros(1, 2, S, S)
pose_field[:, 0], pose_field[:, 1] = 3.0, 2.0  # (dx, dy) in pixels
posed = W.warp(prototype, pose_field)
scratch = torch.zeros(S, S)
diag = torch.arange(22, 42)
scratch[diag, diag] = scratch[diag, diag + 1] = 1.0
scratched = prototype * (1 - scratch) + 0.95 * scratch


def explain(x: torch.Tensor, max_px: float = 4.0, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """The smooth bounded field that best warps the prototype onto x: (reconstruction, field)."""
    theta = torch.zeros(1, 2, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        field = max_px * torch.tanh(W.upsample_field(theta, S))
        loss = torch.nn.functional.mse_loss(W.warp(prototype, field), x) + 1e-3 * W.smoothness_loss(field)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        field = max_px * torch.tanh(W.upsample_field(theta, S))
        return W.warp(prototype, field), field


def blur(maps: torch.Tensor) -> torch.Tensor:
    return gaussian_blur(maps, sigma_for(4.0, S))  # DMAD's sigma 4 at 256 px, scaled to 64 px


alpha = 0.01
inputs = {"normal": prototype, "pose change": posed, "scratch": scratched}
split, table = {}, {}
for name, x in inputs.items():
    rec, field = explain(x)
    a_rec, a_df, score = score_fn(x, rec, [field], alpha, blur)
    plain, _, _ = score_fn(x, prototype, [torch.zeros_like(field)], alpha, blur)
    split[name] = (a_rec[0], a_df[0])
    table[name] = {"max A_rec, no deformation": plain.max().item(), "max A_rec": a_rec.max().item(),
                   "max A_df (px)": a_df.max().item(), "score": score.item()}
print(pd.DataFrame(table).T.round(3).to_string())
foreground = prototype.mean(1)[0] > 0.3
# the pose change is all deformation: |O| on the washer is the length of the true move, nothing is left over
npt.assert_allclose(split["pose change"][1][foreground].mean().item(), float(np.hypot(3, 2)), rtol=0.05)
assert table["pose change"]["max A_rec"] < 0.05 * table["pose change"]["max A_rec, no deformation"]
# the scratch is all residual: the field cannot draw it
assert table["scratch"]["max A_rec"] > 0.9 * table["scratch"]["max A_rec, no deformation"]
assert split["scratch"][1][foreground].mean() < 0.5 * split["pose change"][1][foreground].mean()
assert table["scratch"]["score"] > table["pose change"]["score"] > table["normal"]["score"]

fig, ax = plt.subplots(2, 3, figsize=(7.5, 5), layout="constrained")
for r, name in enumerate(("pose change", "scratch")):
    ax[r, 0].imshow(inputs[name][0].permute(1, 2, 0).clamp(0, 1))
    ax[r, 0].set_title(f"input: {name}", fontsize=9)
    fig.colorbar(ax[r, 1].imshow(split[name][0], cmap="viridis", vmin=0), ax=ax[r, 1], shrink=0.8)
    ax[r, 1].set_title("$A_{rec} * k$", fontsize=9)
    fig.colorbar(ax[r, 2].imshow(split[name][1], cmap="viridis", vmin=0, vmax=4), ax=ax[r, 2], shrink=0.8)
    ax[r, 2].set_title("$A_{df} * k$ (px)", fontsize=9)
for a in ax.flat:
    a.axis("off")
plt.show()

# %% [markdown]
# Without the deformation term a plain reconstruction model flags the pose change too: its residual against
# the unmoved prototype is a sizeable fraction of the scratch's (first column). With it, the move is explained
# by the field and costs only $\alpha$ times its length, while the scratch keeps its full residual (the field
# moves a little to reduce it, but cannot draw the scratch). From the table: above which $\alpha$ would the pose
# change score higher than the scratch? What does that say about choosing $\alpha$, and about why the package
# normalises both terms on the training images before weighing them?
#
# ## 7. Open question: the size of the memory
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

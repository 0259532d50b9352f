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
# # Lab: an affine coupling layer and CFLOW's positional condition (normalizing flows)
#
# **Learning goals.** After this lab you can
# - implement the forward map, the exact inverse and the log-determinant of a RealNVP affine coupling layer,
#   for vectors $[N, D]$ and feature maps $[B, C, H, W]$;
# - explain why the Jacobian is triangular and its log-determinant is just $\sum s$;
# - verify a log-determinant against autograd;
# - write the 2-D sinusoidal positional encoding that CFLOW-AD conditions its flows on, and show on a
#   controlled example why a flow told the position flags a feature that is normal elsewhere but not here;
# - relate the depth of a flow to its results in the pipeline.
#
# **Expected time:** 70 minutes (15 reading, 25 + 15 exercises, 5 demonstration, 10 open question).
#
# **Before you start:** read the sections on change of variables and coupling layers of the chapter
# *Normalizing flows*, and its section "Why the position is a condition: a controlled example".

# %%
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import torch

from vadlab.labs import check_affine_coupling, check_positional_encoding, reference, results_table, show_params
from vadlab.methods.cflow import CFlowConfig, build_decoder
from vadlab.metrics import image_auroc
from vadlab.nn.flows import (AffineCoupling, FixedPermutation, SequentialFlow, jacobian_logdet, soft_clamp,
                             standard_normal_logprob)

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# A flow scores a feature $x$ by its exact likelihood, $\log p_X(x) = \log p_Z(f(x)) + \log |\det J_f(x)|$.
# An affine coupling splits the $D$ channels into $x_1$ (the first $D - \lfloor D/2 \rfloor$) and $x_2$ (the
# rest), and lets a network see only $x_1$:
#
# $$ y_1 = x_1, \qquad y_2 = x_2 \odot \exp(s(x_1)) + t(x_1). $$
#
# The Jacobian $\partial y / \partial x$ is block lower-triangular with the identity and
# $\diag(\exp(s))$ on its diagonal, so $\log |\det J| = \sum_i s_i$ (summed over every entry of a sample, also
# over the positions of a feature map). The inverse needs no inverse network: $s$ and $t$ depend on
# $x_1 = y_1$ only, which the output still contains.
#
# ## 2. Exercise
#
# Write `coupling_forward(x, st_net) -> (y, logdet)` and `coupling_inverse(y, st_net) -> x`. The network is
# given: `st_net(x1)` returns the pair `(s, t)`, each shaped like `x2` (already soft-clamped). `logdet` has one
# value per sample, shape $[N]$. Split along dimension 1.

# %% tags=["solution"]
def coupling_forward(x: torch.Tensor, st_net) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling y = (x1, x2 * exp(s(x1)) + t(x1)) and log|det J| per sample [N]."""
    # BEGIN SOLUTION
    n_keep = x.shape[1] - x.shape[1] // 2
    x1, x2 = x[:, :n_keep], x[:, n_keep:]
    s, t = st_net(x1)
    y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
    return y, s.reshape(s.shape[0], -1).sum(1)
    # END SOLUTION


def coupling_inverse(y: torch.Tensor, st_net) -> torch.Tensor:
    """The exact inverse of coupling_forward."""
    # BEGIN SOLUTION
    n_keep = y.shape[1] - y.shape[1] // 2
    y1, y2 = y[:, :n_keep], y[:, n_keep:]
    s, t = st_net(y1)
    return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)
    # END SOLUTION


# %%
ok = check_affine_coupling(coupling_forward, coupling_inverse)

# %% [markdown]
# ## 3. A small flow on 2-D points
#
# Four couplings, with a channel swap between them so that both coordinates get transformed, map a grid of
# 2-D points. With random subnet weights the map is a smooth, invertible warp; the log-determinant of the
# whole flow (the sum over layers) agrees with autograd's full Jacobian.

# %%
torch.manual_seed(1)
layers = []
for k in range(4):
    coupling = AffineCoupling(2, hidden=16, subnet="mlp")
    for p in coupling.subnet.parameters():
        torch.nn.init.normal_(p, std=0.6)  # random, non-zero (training would set them)
    layers += [coupling, FixedPermutation(2, seed=k)]
flow = SequentialFlow(layers).double()  # float64: checks at 1e-10, not float32 rounding

u = torch.linspace(-2, 2, 21, dtype=torch.float64)
grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
with torch.no_grad():
    z, logdet = flow(grid)
    back = flow.inverse(z)
npt.assert_allclose(back, grid, atol=1e-10)  # exact inverse
npt.assert_allclose(logdet[:20], jacobian_logdet(lambda v: flow(v)[0], grid[:20]).detach(), atol=1e-8)

fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
axes[0].scatter(*grid.T, s=4, c=grid[:, 0], cmap="viridis")
axes[0].set_title("x")
axes[1].scatter(*z.T, s=4, c=grid[:, 0], cmap="viridis")
axes[1].set_title("z = f(x)")
plt.tight_layout()
plt.show()

if ok:  # your layer gives the package's numbers on the first coupling
    first = layers[0]
    def st_net(x1):
        s, t = first.subnet(x1).chunk(2, dim=1)
        return soft_clamp(s, first.clamp), t
    with torch.no_grad():
        y_pkg, ld_pkg = first(grid)
        y_you, ld_you = coupling_forward(grid, st_net)
    npt.assert_allclose(y_you, y_pkg, atol=1e-10)
    npt.assert_allclose(ld_you, ld_pkg, atol=1e-10)

# %% [markdown]
# ## 4. Recap: CFLOW's condition
#
# CFLOW-AD runs one flow per feature scale over *all* fibers $z_i$ of a map, and conditions every coupling on
# the fiber's grid position: the subnets see $[x_1, c_i]$ instead of $x_1$, where $c_i$ is a 2-D sinusoidal
# positional encoding with $P$ channels. The flow then models $p(z \mid c_i)$, one density per position that
# shares all weights. The encoding applies the 1-D Transformer encoding once per axis: with $P/4$ frequencies
# $w_k = 10000^{-2k/(P/2)}$, $k = 0, \dots, P/4 - 1$,
#
# - channels $0 \dots P/2 - 1$ encode the **column** $x$: channel $2k$ is $\sin(x\, w_k)$, channel $2k+1$ is
#   $\cos(x\, w_k)$ (the same for every row);
# - channels $P/2 \dots P - 1$ encode the **row** $y$ in the same way: channel $P/2 + 2k$ is $\sin(y\, w_k)$,
#   channel $P/2 + 2k + 1$ is $\cos(y\, w_k)$ (the same for every column).
#
# Positions are the integer indices $x = 0 \dots W-1$, $y = 0 \dots H-1$. Nearby positions get similar codes
# (the low frequencies change slowly), distant ones different codes, and every position a distinct one.
#
# ## 5. Exercise: the positional encoding
#
# Write `positional_encoding(channels, height, width)`: return the encoding as a **float32** tensor
# $[P, H, W]$ (channels first, like one feature map). `channels` is a multiple of 4. (`CFlow.condition` turns
# it into one row per fiber with `.flatten(1).T`, row-major like the fibers.)

# %% tags=["solution"]
def positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """CFLOW's 2-D sinusoidal positional encoding [channels, height, width] (float32)."""
    # BEGIN SOLUTION
    half = channels // 2
    freq = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # [P/4]
    x = torch.arange(width, dtype=torch.float64)[None, :] * freq[:, None]  # [P/4, W]
    y = torch.arange(height, dtype=torch.float64)[None, :] * freq[:, None]  # [P/4, H]
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(x)[:, None, :]  # broadcast over the rows
    pe[1:half:2] = torch.cos(x)[:, None, :]
    pe[half::2] = torch.sin(y)[:, :, None]  # broadcast over the columns
    pe[half + 1::2] = torch.cos(y)[:, :, None]
    return pe.float()
    # END SOLUTION


# %%
ok_pe = check_positional_encoding(positional_encoding)

# %% [markdown]
# ## 6. Why the position is a condition
#
# The chapter's controlled example, with your encoding as the condition (the package's one until your check
# passes). The fiber at grid position $(r, c)$ of an $8 \times 8$ map is two-dimensional and normal around
# $\mu_{rc} = (4r/7 - 2,\ 4c/7 - 2)$ with noise $0.15$; a *misplaced* fiber carries the normal value of the
# diagonally opposite position: a pattern that is normal in one place and anomalous in another. CFLOW's own
# decoder (`build_decoder`: actnorm, 4 couplings, $P = 16$) is fitted by maximum likelihood twice, once with
# $c_i$ = the encoding of the fiber's position and once with $c_i = 0$, and scores normal against misplaced
# fibers by $-\log \hat p(z \mid c)$. (About 3 s.)

# %%
encode = positional_encoding if ok_pe else reference("positional_encoding")  # yours once the check passes
H_grid = W_grid = 8
rows, cols = torch.meshgrid(torch.arange(H_grid), torch.arange(W_grid), indexing="ij")
mu_grid = torch.stack([rows, cols], -1).reshape(-1, 2).float() / 7 * 4 - 2  # [64, 2]: fiber mean = position
cond_grid = encode(16, H_grid, W_grid).flatten(1).T  # [64, 16], row-major like CFlow.condition


def grid_fibers(n_maps: int, seed: int, source: torch.Tensor = mu_grid) -> torch.Tensor:
    noise = 0.15 * torch.randn(n_maps * H_grid * W_grid, 2, generator=torch.Generator().manual_seed(seed))
    return source.repeat(n_maps, 1) + noise


train_fibers, train_cond = grid_fibers(200, 0), cond_grid.repeat(200, 1)
toy_cfg = replace(CFlowConfig(), coupling_blocks=4, condition_channels=16)


def fit_toy_flow(use_position: bool, steps: int = 600) -> SequentialFlow:
    torch.manual_seed(0)
    flow = build_decoder(2, toy_cfg, seed=0)
    flow.layers[0].initialize(train_fibers)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(train_fibers), (256,), generator=gen)
        c = train_cond[idx] if use_position else torch.zeros_like(train_cond[idx])
        u, ld = flow(train_fibers[idx], c)
        loss = -(standard_normal_logprob(u) + ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


normal_fibers = grid_fibers(20, 2)
moved_fibers = grid_fibers(20, 3, source=mu_grid.flip(0))  # each position gets its opposite's normal value
toy_labels = np.r_[np.zeros(len(normal_fibers)), np.ones(len(moved_fibers))]
toy_auroc = {}
for use_position in (True, False):
    flow = fit_toy_flow(use_position)
    cond = cond_grid.repeat(20, 1) if use_position else torch.zeros(20 * 64, 16)
    with torch.no_grad():
        nll = [-(standard_normal_logprob(u) + ld) for u, ld in (flow(z, cond) for z in (normal_fibers, moved_fibers))]
    key = "conditional (c = PE)" if use_position else "unconditional (c = 0)"
    toy_auroc[key] = image_auroc(toy_labels, torch.cat(nll).numpy())
    print(f"{key:22s} AUROC, misplaced vs normal fibers: {toy_auroc[key]:.3f}")
assert toy_auroc["conditional (c = PE)"] > 0.99  # the position tells the flow what is normal here
assert toy_auroc["unconditional (c = 0)"] < 0.6  # pooled over positions, a misplaced fiber looks normal

# %% [markdown]
# Without the condition the flow can only learn the density of all fibers pooled over the positions, and
# every misplaced value is a normal value of *some* position: chance level. With it, the same network learns
# one density per position. Try it: condition on a constant code (`cond_grid[:1].expand(64, -1)`), or on the
# encoding with the rows and columns swapped (`encode(16, H_grid, W_grid).transpose(1, 2)`). Which of the two
# still separates the fibers, and why?
#
# ## 7. Open question: how deep must a flow be?
#
# CFLOW-AD stacks `coupling_blocks` couplings per feature level (paper: 8; the CPU preset used by the pipeline:
# 8 too, chosen by the held-out likelihood of normal training images).
#
# 1. Predict: with a single coupling block, can the flow still model the normal features? What happens to the
#    half of the channels that a single coupling never transforms?
# 2. In `params.yaml` change the CFLOW line to `cflow: {image_size: 128, preset: cpu, set: {coupling_blocks: 1}}`.
# 3. From the repository root run `dvc repro` (the CFLOW runs and the tables rerun) and `dvc metrics diff`.
# 4. Rerun the cell below.
#
# **Question.** Explain the change in image AUROC and AUPRO with the structure of a coupling layer. Is the
# fit time proportional to the number of blocks? (Restore the line afterwards.)

# %%
show_params("cflow")
results_table("cflow")

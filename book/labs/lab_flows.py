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
# # Lab: an affine coupling layer (normalizing flows)
#
# **Learning goals.** After this lab you can
# - implement the forward map, the exact inverse and the log-determinant of a RealNVP affine coupling layer,
#   for vectors $[N, D]$ and feature maps $[B, C, H, W]$;
# - explain why the Jacobian is triangular and its log-determinant is just $\sum s$;
# - verify a log-determinant against autograd, and relate the depth of a flow to its results in the pipeline.
#
# **Expected time:** 50 minutes (15 reading, 25 exercise, 10 open question).
#
# **Before you start:** read the sections on change of variables and coupling layers of the chapter
# *Normalizing flows*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_affine_coupling, results_table, show_params
from vadlab.nn.flows import AffineCoupling, FixedPermutation, SequentialFlow, jacobian_logdet, soft_clamp

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
# ## 4. Open question: how deep must a flow be?
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

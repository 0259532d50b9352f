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
# # Normalizing flows: CFLOW-AD and PyramidFlow
#
# A **normalizing flow** {cite:p}`dinh2015nice,dinh2017realnvp` is an invertible network $f$ that maps
# data $x$ to a latent $z = f(x)$ whose density is simple (a standard normal, say). Because $f$ is invertible, the density of the data is known
# *exactly*, and "how unlikely is this patch?" becomes a question with a number for an answer.
#
# This chapter derives the change-of-variables formula, builds the coupling layers of
# `vadlab.nn.flows` and checks their log-determinants against autograd, fits a 2-D toy density, proves
# numerically the CFLOW-AD result that a (linear) flow on Gaussian features *is* PaDiM's Mahalanobis
# distance, explains PyramidFlow's **volume normalization**, and runs both methods on generated data.

# %%
import inspect
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import pandas as pd
import torch
from IPython.display import Markdown, display
from scipy import stats
from sklearn.datasets import make_moons

from vadlab.data import DEFECT_KINDS, render_sample
from vadlab.methods import get_method
from vadlab.methods.cflow import CFlow, CFlowConfig, build_decoder
from vadlab.methods.cflow import CPU_PRESET as CFLOW_PRESET
from vadlab.methods.pyramidflow import (LevelCoupling, PyramidFlow, PyramidFlowNet, pyramid_compose,
                                        pyramid_decompose)
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.flows import (ActNorm, AffineCoupling, FixedPermutation, InvertibleConv1x1, SequentialFlow,
                             jacobian_logdet, positional_encoding_2d, standard_normal_logprob)
from vadlab.nn.gaussian import PositionalGaussian
from vadlab.visualize import CMAP, schematic

_ = torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})
assert get_method("cflow") is CFlow and get_method("pyramidflow") is PyramidFlow

# %% [markdown]
# ## At a glance
#
# CFLOW-AD fits a conditional flow to the frozen features of each position, with the position itself as the
# condition; PyramidFlow makes the whole image pyramid invertible and compares latents with a template.

# %%
fig, axes = plt.subplots(2, 1, figsize=(9, 4.6))
schematic({
    "x": (0, 0, "image $x$", "data"),
    "cnn": (1, 0, "frozen CNN\n$K = 3$ scales", "frozen"),
    "pe": (1, 1, "positional encoding\n$c_{ij}$ (the condition)", "data"),
    "flow": (2, 0.5, "conditional flow $g_k$\nper scale (couplings)", "trained"),
    "map": (3, 0.5, "map $= K - \\Sigma_k\\, p_k$, $p_k$ the\nrescaled likelihood\n$p(f_{ij} \\mid c_{ij})$; max: score", "score"),
}, [("x", "cnn"), ("cnn", "flow", "$f_{ij}$"), ("pe", "flow"), ("flow", "map", "$z$")], title="CFLOW-AD", ax=axes[0])
schematic({
    "x": (0, 0, "image $x$", "data"),
    "lift": (1, 0, "$3 \\to C$ lift (or a\nfrozen encoder stem)", "data"),
    "pyr": (2, 0, "invertible Laplacian\npyramid + couplings\n(volume-normalised)", "trained"),
    "tmpl": (2, 1, "template: mean\ntraining latent", "statistics"),
    "map": (3, 0.5, "$|z_l - \\bar z_l|$ composed\nover levels: map;\nmax: image score", "score"),
}, [("x", "lift"), ("lift", "pyr"), ("pyr", "map", "$z_l$"), ("tmpl", "map")], title="PyramidFlow", ax=axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 1. Change of variables
#
# Let $z = f(x)$ with $f$ invertible and differentiable. Probability mass is preserved: a small region
# around $x$ of volume $dV_x$ is mapped to a region of volume $|\det J_f(x)|\,dV_x$ around $z$, where
# $J_f = \partial f / \partial x$. Equating the masses $p_X(x)\,dV_x = p_Z(z)\,|\det J_f(x)|\,dV_x$:
#
# $$\log p_X(x) = \log p_Z(f(x)) + \log\left|\det J_f(x)\right|.$$
#
# With a standard normal base, $\log p_Z(z) = -\tfrac12\|z\|^2 - \tfrac D2\log 2\pi$. Training a flow by
# maximum likelihood means minimising $\tfrac12\|f(x)\|^2 - \log|\det J_f(x)|$: pull the data to the
# origin, but do not shrink space to get there (the log-determinant term forbids collapse).
#
# **Check.** For an affine map $f(x) = A(x - \mu)$ and $Z \sim \mathcal N(0, I)$, $X = \mu + A^{-1}Z$ is
# Gaussian with covariance $\Sigma = A^{-1}A^{-\top}$; the formula must give that density:

# %%
rng = np.random.default_rng(0)
A = rng.normal(size=(3, 3)) + 2 * np.eye(3)
mu = rng.normal(size=3)
x = rng.normal(size=(5, 3))
z = (x - mu) @ A.T
logp_flow = stats.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(z) + np.log(abs(np.linalg.det(A)))
sigma = np.linalg.inv(A) @ np.linalg.inv(A).T
npt.assert_allclose(logp_flow, stats.multivariate_normal(mu, sigma).logpdf(x), rtol=1e-10)
print("change of variables matches the Gaussian density:", np.round(logp_flow, 3))

# %% [markdown]
# ## 2. Coupling layers: invertible by construction, log-determinant for free
#
# A general Jacobian determinant costs $O(D^3)$. The **affine coupling** layer (RealNVP
# {cite:p}`dinh2017realnvp`) makes it a sum.
# Split $x = (x_1, x_2)$ and let a network see only $x_1$ (and, in a *conditional* flow, a condition
# $c$):
#
# $$y_1 = x_1, \qquad y_2 = x_2 \odot \exp\big(s(x_1, c)\big) + t(x_1, c).$$
#
# The Jacobian is block lower-triangular,
# $\begin{pmatrix} I & 0 \\ \partial y_2/\partial x_1 & \operatorname{diag}(e^{s}) \end{pmatrix}$, so
# $\log|\det J| = \sum_i s_i$ whatever the network $s, t$ is, and the inverse is
# $x_2 = (y_2 - t(y_1, c)) \odot e^{-s(y_1, c)}$: no network inversion needed. To keep $e^{s}$ in check,
# $s$ is **soft-clamped**: $s \mapsto \alpha \tfrac{2}{\pi}\arctan(s/\alpha)$, so $|s| < \alpha$
# ($\alpha = 1.9$ in CFLOW-AD). This is FrEIA's arctan clamp (its GLOW and RealNVP blocks) and PyramidFlow's;
# the FrEIA `AllInOneBlock` of CFLOW-AD's official code clamps as $\alpha\tanh(0.1\,s)$ instead, with the
# same bound $\alpha$ but slope $0.1\,\alpha$ at zero rather than $2/\pi$. Permutations (or invertible $1\times1$ convolutions {cite:p}`kingma2018glow`,
# $\log|\det| = \log|\det W|$ per position) between couplings let every coordinate be transformed.
#
# **Check against autograd's full Jacobian** (float64, random non-zero weights):

# %%
torch.set_default_dtype(torch.float64)
flow = SequentialFlow([ActNorm(6), AffineCoupling(6, cond_channels=4, hidden=16), FixedPermutation(6, 1),
                       AffineCoupling(6, cond_channels=4, hidden=16), InvertibleConv1x1(6, seed=3),
                       AffineCoupling(6, cond_channels=4, hidden=16)]).double()
with torch.no_grad():
    for p in flow.parameters():
        p.copy_(0.4 * torch.randn_like(p))
xs, cs = torch.randn(4, 6), torch.randn(4, 4)
zs, logdet = flow(xs, cs)
ref = torch.cat([jacobian_logdet(lambda v: flow(v, cs[i:i + 1])[0], xs[i:i + 1]) for i in range(4)])
npt.assert_allclose(logdet.detach().numpy(), ref.numpy(), atol=1e-8)
npt.assert_allclose(flow.inverse(zs, cs).detach().numpy(), xs.numpy(), atol=1e-10)
print("log|det J| from the layers:", logdet.detach().numpy().round(4))
print("log|det J| from autograd:  ", ref.numpy().round(4))
torch.set_default_dtype(torch.float32)
print(inspect.getsource(AffineCoupling.forward))

# %% [markdown]
# ## 3. A 2-D toy density
#
# Eight couplings with permutations, fitted by maximum likelihood to the two-moons data; the density
# $p_X(x) = \mathcal N(f(x); 0, I)\,|\det J_f(x)|$ is evaluated on a grid. A single Gaussian (the best
# a linear flow can do) is the baseline: the flow must reach a clearly better held-out likelihood.

# %%
_ = torch.manual_seed(0)
moons = torch.tensor(make_moons(2000, noise=0.06, random_state=0)[0], dtype=torch.float32)
moons = (moons - moons.mean(0)) / moons.std(0)
train_m, held_m = moons[:1600], moons[1600:]
layers = []
for k in range(8):
    layers += [AffineCoupling(2, hidden=64, clamp=2.0), FixedPermutation(2, seed=k)]
toy = SequentialFlow(layers)
opt = torch.optim.Adam(toy.parameters(), lr=3e-3)
for step in range(600):
    batch = train_m[torch.randint(0, len(train_m), (256,))]
    z_b, ld = toy(batch)
    loss = -(standard_normal_logprob(z_b) + ld).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
with torch.no_grad():
    z_h, ld_h = toy(held_m)
    nll_flow = -(standard_normal_logprob(z_h) + ld_h).mean().item()
gauss = stats.multivariate_normal(train_m.mean(0).numpy(), np.cov(train_m.numpy().T))
nll_gauss = -gauss.logpdf(held_m.numpy()).mean()
print(f"held-out NLL: flow {nll_flow:.3f} nats, single Gaussian {nll_gauss:.3f} nats")
assert nll_flow < nll_gauss - 0.3, "the flow should beat a Gaussian on two moons"

g = torch.linspace(-2.5, 2.5, 120)
grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
with torch.no_grad():
    zg, ldg = toy(grid)
    dens = torch.exp(standard_normal_logprob(zg) + ldg).reshape(120, 120)
cell = (g[1] - g[0]).item() ** 2
print(f"the density integrates to {dens.sum().item() * cell:.3f} over the window")
fig, axes = plt.subplots(1, 3, figsize=(9, 3))
axes[0].scatter(*train_m[:600].T, s=2)
axes[0].set_title("training data")
fig.colorbar(axes[1].imshow(dens, origin="lower", extent=(-2.5, 2.5, -2.5, 2.5), cmap=CMAP), ax=axes[1], shrink=0.8)
axes[1].set_title("flow density $p_X$")
with torch.no_grad():
    axes[2].scatter(*toy(train_m[:600])[0].T, s=2)
axes[2].set_title("latents $z = f(x)$")
for ax in axes:
    ax.set_aspect("equal")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. CFLOW-AD: a flow on Gaussian features is the Mahalanobis distance
#
# CFLOW-AD {cite:p}`gudovskiy2022cflow`, which extends DifferNet's image-level flow
# {cite:p}`rudolph2021differnet` to anomaly maps, argues that features of a CNN trained with weight decay are
# roughly Gaussian, $z \sim \mathcal N(\mu, \Sigma)$. Then the flow's loss is
#
# $$-\log \hat p(z) = \tfrac12\|f(z)\|^2 - \log|\det J_f| + \tfrac D2\log 2\pi ,$$
#
# and the best *linear* flow is the whitening transform $f(z) = \Sigma^{-1/2}(z - \mu)$ (or any rotation
# of it), with $\|f(z)\|^2 = M(z)^2 = (z-\mu)^\top\Sigma^{-1}(z-\mu)$ and
# $\log|\det J_f| = -\tfrac12\log\det\Sigma$. So the loss equals
# $\tfrac12 M(z)^2 + \tfrac12\log\det(2\pi\Sigma)$: **PaDiM's squared Mahalanobis distance plus a
# constant.** A nonlinear flow generalises this to non-Gaussian features.
#
# **Check.** Fit a linear flow (actnorm + LU $1\times1$ "convolution", i.e. $u = W\,\mathrm{diag}(e^{a})(z + b)$)
# by maximum likelihood to Gaussian samples, and compare with PaDiM's `PositionalGaussian` distance
# (one position, no ridge) on fresh samples:

# %%
_ = torch.manual_seed(1)
D = 4
L_true = torch.tensor(np.tril(rng.normal(size=(D, D))) + 2 * np.eye(D), dtype=torch.float32)
mu_true = torch.randn(D)
samples = mu_true + torch.randn(6000, D) @ L_true.T
linear = SequentialFlow([ActNorm(D), InvertibleConv1x1(D, seed=0)])
linear.layers[0].initialize(samples)
opt = torch.optim.Adam(linear.parameters(), lr=2e-2)
for step in range(700):
    u, ld = linear(samples)
    loss = -(standard_normal_logprob(u) + ld).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

gaussian = PositionalGaussian()
gaussian.update(samples[:, :, None, None])
gaussian.finalize(0.0)
fresh = mu_true + torch.randn(500, D) @ L_true.T
with torch.no_grad():
    u, ld = linear(fresh)
    nll = -(standard_normal_logprob(u) + ld)
maha = gaussian.distance(fresh[:, :, None, None]).flatten()
gap = nll - 0.5 * maha ** 2
cov = torch.linalg.inv(gaussian.precision[0, 0].double())
const = 0.5 * torch.logdet(2 * math.pi * cov).item()
print(f"NLL - M^2/2: mean {gap.mean():.4f} (1/2 log det(2 pi Sigma) = {const:.4f}), std {gap.std():.2e}")
npt.assert_allclose(gap.numpy(), const, atol=0.02)
fig, ax = plt.subplots(figsize=(3.4, 3))
ax.scatter(0.5 * maha ** 2, nll, s=3)
ax.set_xlabel(r"PaDiM: $\frac{1}{2}M(z)^2$")
ax.set_ylabel(r"linear flow: $-\log \hat p(z)$")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The CFLOW-AD model
#
# - a frozen encoder gives $K$ feature maps (scales); each position $i$ of scale $k$ is a *fiber*
#   $z^k_i \in \mathbb R^{D_k}$;
# - per scale a **conditional** flow $g_k$: the coupling subnets see the fiber and a 2-D sinusoidal
#   positional encoding {cite:p}`vaswani2017attention` $c_i$ of its grid position ($P = 128$ channels in the paper: sin/cos of the
#   column in the first half, of the row in the second). One flow serves all positions, yet the density
#   may depend on where the patch is, which is what PaDiM buys with one Gaussian per position;
# - training: maximum likelihood (per dimension) on random mini-batches of $N = 256$ fibers from all
#   positions of all images;
# - test: per scale $p^k_i = \exp(\log\hat p(z^k_i)/D_k - m_k)$, upsampled and summed; the anomaly map is
#   $K - \sum_k p^k$, the image score its maximum.
#
# **A departure on purpose:** the official code sets $m_k$ to the maximum log-likelihood over the *test
# set*, so a test image's score depends on which other images are tested with it. `vadlab` uses the
# maximum over the **training** fibers of scale $k$, stored at the end of `fit`.

# %%
pe = positional_encoding_2d(16, 8, 8)
fig, axes = plt.subplots(1, 4, figsize=(8.6, 2.2), layout="constrained")
for ax, ch in zip(axes, (0, 3, 8, 11)):
    im = ax.imshow(pe[ch], cmap="coolwarm", vmin=-1, vmax=1)  # a signed quantity: a diverging colormap
    ax.set_title(f"PE channel {ch}")
    ax.axis("off")
fig.colorbar(im, ax=axes.tolist(), shrink=0.9)
plt.show()
npt.assert_allclose((pe[0] ** 2 + pe[1] ** 2).numpy(), 1.0, atol=1e-6)  # sin^2 + cos^2 per frequency
print(inspect.getsource(CFlow.predict))

# %% [markdown]
# ### Why the position is a condition: a controlled example
#
# A feature that is normal *somewhere* can be anomalous *here*: a screw head where the thread should be, a
# component on the wrong pad.  A single unconditional density of all fibers cannot see that; one density per
# position (PaDiM) or one flow conditioned on the position (CFLOW) can.  Below, the fiber at grid position
# $(r, c)$ of an $8\times 8$ map is two-dimensional and normal around $\mu_{rc} = (4r/7 - 2,\ 4c/7 - 2)$, the
# position itself, with noise $0.15$.  A *misplaced* fiber carries the normal value of the diagonally opposite
# position.  The same `build_decoder` CFLOW uses (actnorm, 4 couplings) is trained twice by maximum likelihood,
# once with the positional encoding $c_i$ and once with $c_i = 0$ (the same network, told nothing about where
# the fiber is), and scores normal against misplaced fibers by $-\log \hat p(z \mid c)$.

# %%
H_grid = W_grid = 8
rows, cols = torch.meshgrid(torch.arange(H_grid), torch.arange(W_grid), indexing="ij")
mu_grid = torch.stack([rows, cols], -1).reshape(-1, 2).float() / 7 * 4 - 2  # [64, 2]: fiber mean = position
pe_grid = positional_encoding_2d(16, H_grid, W_grid).flatten(1).T  # [64, 16], row-major like CFlow.condition


def grid_fibers(n_maps: int, seed: int, source: torch.Tensor = mu_grid) -> torch.Tensor:
    noise = 0.15 * torch.randn(n_maps * H_grid * W_grid, 2, generator=torch.Generator().manual_seed(seed))
    return source.repeat(n_maps, 1) + noise


toy_train, toy_cond = grid_fibers(200, 0), pe_grid.repeat(200, 1)
toy_cfg = replace(CFlowConfig(), coupling_blocks=4, condition_channels=16)


def fit_toy_flow(use_position: bool) -> SequentialFlow:
    torch.manual_seed(0)
    flow = build_decoder(2, toy_cfg, seed=0)
    flow.layers[0].initialize(toy_train)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(1500):
        idx = torch.randint(len(toy_train), (256,), generator=gen)
        c = toy_cond[idx] if use_position else torch.zeros_like(toy_cond[idx])
        u, ld = flow(toy_train[idx], c)
        loss = -(standard_normal_logprob(u) + ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


normal_fibers = grid_fibers(20, 2)
moved_fibers = grid_fibers(20, 3, source=mu_grid.flip(0))  # each position gets its opposite's normal value
toy_labels = np.r_[np.zeros(len(normal_fibers)), np.ones(len(moved_fibers))]
# one test map: the top-left 3x3 block misplaced, the rest normal
one_map = mu_grid.clone()
block = ((rows < 3) & (cols < 3)).flatten()
one_map[block] = mu_grid.flip(0)[block]
toy_auroc, toy_maps = {}, {}
for use_position in (True, False):
    flow = fit_toy_flow(use_position)
    cond = pe_grid.repeat(20, 1) if use_position else torch.zeros(20 * 64, 16)
    with torch.no_grad():
        nll = [-(standard_normal_logprob(u) + ld) for u, ld in (flow(z, cond) for z in (normal_fibers, moved_fibers))]
        u, ld = flow(one_map, cond[:64])
    key = "conditional (c = PE)" if use_position else "unconditional (c = 0)"
    toy_auroc[key] = image_auroc(toy_labels, torch.cat(nll).numpy())
    toy_maps[key] = (-(standard_normal_logprob(u) + ld)).reshape(H_grid, W_grid)
display(pd.DataFrame({"AUROC, misplaced vs normal fibers": toy_auroc}).round(3))
assert toy_auroc["conditional (c = PE)"] > 0.99  # the position tells the flow what is normal here
assert toy_auroc["unconditional (c = 0)"] < 0.6  # pooled over positions, a misplaced fiber looks normal

fig, axes = plt.subplots(1, 3, figsize=(8.4, 2.8), layout="constrained")
axes[0].imshow(block.reshape(H_grid, W_grid), cmap="gray")
axes[0].set_title("misplaced fibers")
vmax = max(float(m.max()) for m in toy_maps.values())
for ax, (key, m) in zip(axes[1:], toy_maps.items()):
    im = ax.imshow(m, cmap=CMAP, vmin=min(float(v.min()) for v in toy_maps.values()), vmax=vmax)
    ax.set_title(f"$-\\log \\hat p$, {key}", fontsize=8)
for ax in axes:
    ax.axis("off")
fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8, label="negative log-likelihood")
plt.show()

# %% [markdown]
# The conditional flow flags the misplaced block; the unconditional one scores it like the rest, because
# each misplaced value is a normal value of some other position.  On aligned objects this is the difference
# between one flow for all positions and one flow that knows the position, at the price of $P$ extra input
# channels to every coupling subnet.  (Exercise 6 asks what conditioning buys on a texture, where the position
# carries no information.)

# %% [markdown]
# ## 5. PyramidFlow and volume normalization
#
# PyramidFlow {cite:p}`lei2023pyramidflow` is a flow on the image itself (or on an early feature map): a
# Laplacian pyramid splits the input into $L$ levels, and **pyramid coupling blocks** transform each level
# with affine parameters predicted from its neighbouring levels, followed by invertible $1\times1$
# convolutions. The decomposition is exactly invertible by composition:

# %%
img = torch.rand(1, 3, 64, 64)
levels = pyramid_decompose(img, 4)
print("level shapes:", [tuple(l.shape[-2:]) for l in levels])
npt.assert_allclose(pyramid_compose(levels).numpy(), img.numpy(), atol=1e-6)

# %% [markdown]
# **Why volume normalization.** PyramidFlow's loss pulls the latents of *normal images together*
# (pairwise differences, no likelihood term). Any flow could satisfy that by shrinking everything:
# $f(x) = a x$ with $0 < a \ll 1$ makes every difference tiny and would flag nothing. In likelihood terms the shrinking
# is paid for by $\log|\det J| = D\log a \to -\infty$; PyramidFlow removes the term instead by
# forcing $|\det J| = 1$. Its **volume normalization** subtracts the mean of the log-scales (over channels,
# CVN, or positions, SVN): with $\sum_i s_i = 0$ the coupling's $\log|\det J| = 0$, so
#
# $$-\log p(x) = -\log p(z) - \underbrace{\log|\det J|}_{=0} = \tfrac12\|z - \bar z\|^2 + \text{const},$$
#
# with the base distribution centred on the **latent template** $\bar z$ (the mean training latent).
# Minimising it can only rearrange volume (shrink some directions, stretch others), never remove it:
# normal variation is squeezed, so anything off-template stands out. At test time the batch mean is
# replaced by a running mean (the paper's Algorithm 2).
#
# **Check:** a whole pyramid flow in training mode has $\log|\det J| = 0$, also by autograd, and still
# transforms its input:

# %%
torch.set_default_dtype(torch.float64)
net = PyramidFlowNet(channels=2, levels=3, stacks=2, kernel_size=3, clamp=2.0, vn="cvn").double()
with torch.no_grad():
    for p in net.parameters():
        p.copy_(0.3 * torch.randn_like(p))
pyr = pyramid_decompose(torch.randn(2, 2, 8, 8), 3)
net.train()
zs_p, ld_p = net(pyr)
sizes = [p[0].numel() for p in pyr]


def flat_flow(v):
    parts = v.reshape(1, -1).split(sizes, dim=1)
    return torch.cat([z.reshape(1, -1) for z in net([p.reshape(1, *q.shape[1:]) for p, q in zip(parts, pyr)])[0]], 1)


x0 = torch.cat([p[:1].reshape(1, -1) for p in pyr], 1)
auto = jacobian_logdet(flat_flow, x0)
print(f"log|det J|: layers {ld_p.detach().numpy()}, autograd {auto.item():.2e}; "
      f"mean |z - x| = {torch.cat([(a - b).abs().flatten() for a, b in zip(zs_p, pyr)]).mean():.3f}")
npt.assert_allclose(ld_p.detach().numpy(), 0.0, atol=1e-9)
npt.assert_allclose(auto.numpy(), 0.0, atol=1e-8)
torch.set_default_dtype(torch.float32)

# %% [markdown]
# And the collapse it prevents, in one dimension: minimise the pair loss $\mathbb E(a x_i - a x_j)^2$
# over a scale $a$. Free, $a$ goes to zero (every image looks alike, including defective ones);
# volume-normalised ($|a| = 1$ fixed) the loss stays at the data's own spread:

# %%
xs1 = torch.randn(256)
a = torch.tensor(1.0, requires_grad=True)
opt = torch.optim.SGD([a], lr=0.05)
for _ in range(200):
    loss = ((a * xs1[:128] - a * xs1[128:]) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"free scale after training: a = {a.item():.2e} (collapsed); log|det| = {math.log(abs(a.item())):.1f}")
assert abs(a.item()) < 1e-3

# %% [markdown]
# The loss compares all pairs of a batch: per level the squared latent difference, composed back to full
# resolution ("pyramid difference"), averaged over channels, then the mean magnitude of its 2-D Fourier
# transform ("Fourier loss"). The transform is the unnormalised DFT of the official code (`torch.fft.fft2`
# with its default `norm="backward"`); `fft_norm="ortho"` divides it by $\sqrt{HW}$, which matters despite
# Adam's scale invariance because gradient clipping at 1.0, Adam's `eps` $= 10^{-4}$ and its weight
# decay are absolute. At test time the map is the composed pyramid of $|z_l - \bar z_l|$.

# %%
print(inspect.getsource(PyramidFlow.pair_loss))
print(inspect.getsource(LevelCoupling.params))

# %% [markdown]
# ## 6. A small run on the generated data
#
# Forty normal training washers and twenty test washers at 128 px (the pipeline uses 200 / 80), both
# methods with their small-CPU settings (CFLOW-AD 2 scales here to stay fast; PyramidFlow on
# EfficientNet-Lite0 `blocks.1` features). Twenty test images: a rough indication only.

# %%
size, category = 128, "washer"


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


train = to_tensor([render_sample(category, None, split="train", index=k, size=size)[1] for k in range(40)])
kinds = DEFECT_KINDS[category]
test_items = ([render_sample(category, None, index=k, size=size) for k in range(10)]
              + [render_sample(category, kinds[k % len(kinds)], index=k // len(kinds), size=size) for k in range(10)])
test_x = to_tensor([t[1] for t in test_items])
test_m = np.stack([t[2] for t in test_items]).astype(np.uint8)
test_y = np.array([0] * 10 + [1] * 10)
loader = torch.utils.data.DataLoader(train, batch_size=20)

cflow = CFlow(**{**CFLOW_PRESET, "layers": ("blocks.1", "blocks.2"), "meta_epochs": 4}).fit(loader)
pflow = PyramidFlow(encoder="efficientnet_lite0", encoder_layer="blocks.1", levels=3, stacks=2, kernel_size=3,
                    epochs=4, batch_size=4, lr=1e-3).fit(loader)
results = {}
for name, model in (("CFLOW-AD", cflow), ("PyramidFlow", pflow)):
    s, m = model.predict(test_x)
    assert torch.isfinite(m).all() and m.shape == (20, size, size)
    results[name] = (s, m)
    print(f"{name}: image AUROC {image_auroc(test_y, s):.3f}, pixel AUROC {pixel_auroc(test_m, m):.3f}")
assert pixel_auroc(test_m, results["CFLOW-AD"][1]) > 0.85 and pixel_auroc(test_m, results["PyramidFlow"][1]) > 0.85

# %%
show = [10, 12, 14, 16, 0]
fig, axes = plt.subplots(3, len(show), figsize=(2.0 * len(show), 6.2))
shown = {}
for k, i in enumerate(show):
    axes[0, k].imshow(test_x[i].permute(1, 2, 0))
    axes[0, k].set_title("normal" if test_y[i] == 0 else f"defect #{i}")
    for row, (name, (s, m)) in enumerate(results.items(), start=1):
        lo, hi = np.percentile(m.numpy(), [1, 99.9])
        axes[row, k].imshow(test_x[i].permute(1, 2, 0))
        shown[name] = axes[row, k].imshow(m[i], cmap=CMAP, alpha=0.5, vmin=lo, vmax=hi)
        if test_m[i].any():
            axes[row, k].contour(test_m[i], levels=[0.5], colors="w", linewidths=0.7)
        axes[row, k].set_title(f"{name} {s[i]:.2f}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("anomaly maps (ground truth outlined in white)")
fig.tight_layout()
for row, name in enumerate(results, start=1):  # one colour scale per method
    fig.colorbar(shown[name], ax=axes[row, :].tolist(), fraction=0.02, pad=0.01, label=f"{name} score")
plt.show()

# %% [markdown]
# CFLOW-AD's scores do not depend on the rest of the test batch (the normalisation is a training
# statistic), and both models round-trip through `save` / `load`:

# %%
alone = cflow.predict(test_x[:2])[0]
npt.assert_allclose(alone.numpy(), results["CFLOW-AD"][0][:2].numpy(), atol=1e-5)
with tempfile.TemporaryDirectory() as tmp:
    for model in (cflow, pflow):
        again = type(model).load(model.save(Path(tmp) / f"{model.name}.pt"))
        npt.assert_array_equal(again.predict(test_x[:2])[1].numpy(), model.predict(test_x[:2])[1].numpy())
print("CFLOW-AD training maxima m_k:", cflow.train_max_logp.numpy().round(3))

# %% [markdown]
# **When to stop: a held-out split of normal images.** The CPU preset holds out a fifth of the normal
# training images (`val_fraction=0.2`, a seeded split; here 8 of the 40 washers), fits on the rest, and
# after every sub-epoch measures the held-out images' per-dimension negative log-likelihood; the weights
# with the lowest value are kept (`best_epoch`). Test images play no part (the official code keeps the
# epoch with the best *test* AUROC). The preset's depth, 8 couplings, was chosen the same way:
# `benchmarks/cflow_presets.py` compares candidate presets by the held-out NLL of the generated data's
# normal training images only, and writes the test AUROC of the chosen one afterwards
# (`benchmarks/results/cflow_presets_*`).

# %%
curves = pd.DataFrame(cflow.history)
fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
ax.plot(curves["epoch"] + 1, curves["loss"], "o-", label="training loss (fitted images)")
ax.plot(curves["epoch"] + 1, curves["val_nll"], "s-", label="held-out normal images")
ax.axvline(cflow.best_epoch + 1, color="0.5", ls=":", label="weights kept")
ax.set(xlabel="sub-epoch", ylabel="NLL per dimension (nats)", title="CFLOW-AD, CPU preset, 32 + 8 washers")
ax.legend(fontsize=8)
plt.show()
assert len(cflow.val_indices) == 8 and cflow.best_epoch == int(curves["val_nll"].idxmin())
still_falling = cflow.best_epoch == len(curves) - 1
print(f"held-out NLL per sub-epoch: {curves['val_nll'].round(3).tolist()}; kept sub-epoch {cflow.best_epoch + 1} "
      f"of {len(curves)}: " + ("still falling at the end, so the budget ends training, not over-fitting"
                               if still_falling else "past its minimum, so the held-out split stopped over-fitting"))

# %% [markdown]
# **The Gaussian is the one-block linear flow, on CFLOW-AD's own features.** Section 4 showed it on
# Gaussian samples; the identity $-\log\hat p(z) = \tfrac12 M(z)^2 + \tfrac12\log\det(2\pi\Sigma)$ holds
# for any data once both are fitted by maximum likelihood, since the best linear flow whitens with the
# sample covariance. Here on the fibers of CFLOW-AD's first scale (`blocks.1`, 24 channels, 32 x 32
# positions of the 40 training washers), pooled over positions (one Gaussian for all positions, as an
# unconditional flow is one density for all positions; PaDiM keeps one per position), scored on the
# test washers' fibers, the defective ones included:

# %%
with torch.no_grad():
    feats_train, feats_test = cflow.backbone(train)[0], cflow.backbone(test_x)[0]
D = feats_train.shape[1]
fib_train = feats_train.permute(0, 2, 3, 1).reshape(-1, D)
fib_test = feats_test.permute(0, 2, 3, 1).reshape(-1, D)
linear = SequentialFlow([ActNorm(D), InvertibleConv1x1(D, seed=0)])
linear.layers[0].initialize(fib_train)
opt = torch.optim.Adam(linear.parameters(), lr=2e-2)
for step in range(700):
    u, ld = linear(fib_train)
    loss = -(standard_normal_logprob(u) + ld).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
pooled = PositionalGaussian()
pooled.update(fib_train[:, :, None, None])
pooled.finalize(0.0)
with torch.no_grad():
    u, ld = linear(fib_test)
    nll = -(standard_normal_logprob(u) + ld)
maha = pooled.distance(fib_test[:, :, None, None]).flatten()
gap = nll - 0.5 * maha ** 2
const = 0.5 * torch.logdet(2 * math.pi * torch.linalg.inv(pooled.precision[0, 0].double())).item()
rho = stats.spearmanr(nll.numpy(), maha.numpy()).statistic
print(f"{len(fib_test)} test fibers: NLL - M^2/2 = {gap.mean():.4f} +- {gap.std():.3f} "
      f"(1/2 log det(2 pi Sigma) = {const:.4f}; NLL spans {nll.min():.0f} .. {nll.max():.0f}); "
      f"Spearman(NLL, M) = {rho:.5f}")
assert abs(gap.mean().item() - const) < 0.05 and gap.std().item() < 0.02 * nll.std().item() and rho > 0.999

# %% [markdown]
# ## 7. Results on the generated dataset
#
# Results on the generated dataset: see the Results chapter, {doc}`results`. The table below is read from the pipeline
# (`dvc repro`, stages `evaluate@cflow` and `evaluate@pyramidflow`), with the
# small-CPU presets (`CFlowConfig.cpu_preset()`, `PyramidFlowConfig.cpu_preset()`) at 128 px, mean over
# the pipeline's seeds.

# %%
from vadlab.report import pipeline_file

table_path = pipeline_file("tables/per_category.csv")
if table_path is not None:
    table = pd.read_csv(table_path)
    cols = ["image_auroc", "pixel_auroc", "aupro", "fit_seconds", "predict_seconds_per_image"]
    for method in ("cflow", "pyramidflow"):
        part = table[table.method == method].groupby("category", sort=False)[cols].mean()  # over seeds
        if len(part):
            display(Markdown(f"**{method}**"))
            display(part[cols].style.format("{:.3f}"))

# %% [markdown]
# ## 8. Published numbers and departures from the papers
#
# **CFLOW-AD** {cite:p}`gudovskiy2022cflow` (WRN-50, MVTec AD): image AUROC 98.26, pixel AUROC 98.62,
# AUPRO 94.60 (the paper's results as listed by Papers with Code). These are the best
# epoch *on the test set* with per-class input sizes (128-512 px), and probabilities normalised by the
# test-set maximum. Departures here: training-data normalisation ($m_k$ = max training log-likelihood);
# final weights (no epoch selection); EfficientNet-Lite0 (blocks 2, 4, 6 by default, strides as WRN-50
# layers 2-4; the 128 px preset takes blocks 1, 2, 4); an actnorm layer initialised on the training
# fibers opens each decoder (it stands in for the learnt global affine of the FrEIA AllInOneBlock that
# the official code uses in every block), with each channel's standard deviation floored at 0.1 times
# the mean over channels, so that a channel constant on the training fibers cannot amplify a test
# deviation a millionfold (an absolute floor of $10^{-6}$ would); hard permutations where the code's
# `permute_soft=True` mixes the channels with a fixed random rotation from SO(D) after every block;
# $\tanh$ rather than $\arctan$ soft clamp in the code (section 2); plain per-dimension NLL (the code
# adds $-\log\sigma(\cdot)$); cached encoder features, no rotation augmentation.
#
# **PyramidFlow** {cite:p}`lei2023pyramidflow` (MVTec AD without grid, metal nut and screw, pixel AUROC /
# AUPRO): without pretrained model (FNF) 96.0 / 94.5; with the ResNet-18 encoder 97.1 / 96.5 (its
# Table 3); on BTAD {cite:p}`mishra2021btad` 95.8 / 97.7 image / pixel AUROC (its Table 4). The code keeps the best test epoch and integrates
# AUPRO over the full FPR range (no 0.3 cut), which inflates PRO. As in the code, the baseline's
# $3 \to C$ lift stays frozen at its orthonormal initialisation ($W^\top W = I$; `train_lift=True` trains it,
# volume-normalised) and the Fourier loss is unnormalised. The code also picks SVN for bottle, carpet, grid
# and transistor and 8 levels for carpet, metal nut and transistor (2 for screw); `configs/mvtec.yaml` lists
# these but runs one setting for all classes. Departures here: even/odd level couplings as a compact form of the scale-wise and
# dual couplings; subsampling after blur for downsampling; EfficientNet-Lite0 `blocks.1` as the
# pretrained variant's encoder; no texture augmentation; no test-set epoch selection.
#
# ## Summary
#
# - A flow gives an **exact likelihood**: $\log p_X(x) = \log p_Z(f(x)) + \log|\det J_f(x)|$, and affine
#   couplings make $f$ invertible and the log-determinant a sum, whatever their subnetworks are.
# - **CFLOW-AD** fits one conditional flow per feature scale to the fibers of a frozen encoder; with a
#   linear flow on Gaussian features its loss is PaDiM's squared Mahalanobis distance plus a constant,
#   and the positional condition lets one flow serve every position.
# - **PyramidFlow** drops the likelihood: it pulls the latents of normal images towards a template, and
#   **volume normalization** ($\log|\det J| = 0$) is what stops it from collapsing everything to a point.
# - Both assume only normal training images; CFLOW-AD needs a pretrained encoder, PyramidFlow's baseline
#   does not, and both train for a while (minutes here, hours at paper scale).
#
# ## Exercises
#
# 1. *(numerical)* For the coupling layer of section 2 with $D = 6$ and soft clamp $\alpha = 1.9$, what
#    are the largest and smallest possible values of $\log|\det J|$? Check with a subnetwork whose output
#    you force to $\pm 10^3$.
# 2. *(conceptual)* CFLOW-AD turns log-likelihoods into $\exp(\log\hat p / D_k - m_k)$ before summing the
#    scales. What would summing the log-likelihoods instead change for a defect seen at one scale only?
# 3. *(numerical)* In the 1-D collapse example of section 5, add a likelihood term $-\log|a|$ to the pair
#    loss. Where is the new minimum, and why does it no longer collapse?
# 4. *(pipeline)* Run `dvc exp run -S '+methods.cflow.set.coupling_blocks=2'` and compare with the committed
#    run in `dvc exp show --only-changed`: what does the flow's depth buy on the generated data?
# 5. *(pipeline)* Run `dvc exp run -S '+methods.pyramidflow.set.volume_norm=svn'` (the spatial variant)
#    and read the per-category rows: for which categories does the choice matter, and does that agree with
#    the paper's Table 1 (CVN better on capsule, pill and toothbrush; SVN on carpet, grid and zipper)?
# 6. *(numerical)* In the controlled example of section 4, make every position's normal mean the same
#    ($\mu_{rc} = 0$, a texture) and misplace nothing; instead add a few fibers far from 0. Does the
#    conditional flow still beat the unconditional one? Compare their training losses and explain.
#
# The lab of this chapter, {download}`labs/lab_flows.py` (see {doc}`course_labs`), has you implement an
# affine coupling layer (forward, inverse and log-determinant) and CFLOW's 2-D positional encoding, the
# condition of the controlled example of section 4.

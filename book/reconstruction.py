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
# # Reconstruction: from autoencoders to inpainting
#
# The oldest idea in visual anomaly detection: train a network to **reproduce** defect-free images,
# then call anomalous whatever it fails to reproduce.  The anomaly map is a distance between the
# image $x$ and its reconstruction $\hat x$.  Two questions decide whether this works:
#
# 1. **Which distance?**  A per-pixel squared error $\|x - \hat x\|^2$ punishes every slightly blurred
#    edge of a texture, and an autoencoder's output is always a little blurred.  {cite:t}`bergmann2019aessim`
#    proposed the structural similarity SSIM {cite:p}`wang2004ssim` instead (**AE-SSIM**,
#    `vadlab.methods.ae_ssim`), and RIAD {cite:p}`zavrtanik2021riad` the gradient-magnitude similarity GMS.
# 2. **Does the network reconstruct too well?**  An autoencoder that sees the defect in its input can
#    copy it to its output: it *generalises* to the anomaly, and the error is small exactly where it
#    should be large.  The bottleneck only fights this indirectly.  **RIAD** (`vadlab.methods.riad`)
#    removes the problem at its root: the network never sees the pixels it has to draw.
#
# This chapter defines both similarities, checks them on images whose answer we know, and then looks
# at RIAD's masks and reconstructions on the generated dataset.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from skimage.metrics import structural_similarity

from vadlab.nn.similarity import gms_map, msgms_loss, ssim, ssim_map
from vadlab.visualize import CMAP, schematic

_ = torch.manual_seed(0)

# %% [markdown]
# ## At a glance
#
# Both methods train a network on normal images to reproduce them and score the difference between an
# image and its reproduction. AE-SSIM squeezes the image through a bottleneck; RIAD never lets the network
# see the part it reproduces.

# %%
fig, axes = plt.subplots(2, 1, figsize=(9, 4.6))
schematic({
    "x": (0, 0, "image $x$\n(patches)", "data"),
    "enc": (1, 0, "encoder", "trained"),
    "z": (2, 0, "bottleneck\nvector $z$", "data"),
    "dec": (3, 0, "decoder", "trained"),
    "map": (3, 1, "$1 - \\mathrm{SSIM}(x, \\hat x)$ per pixel\nmap; max: image score", "score"),
}, [("x", "enc"), ("enc", "z"), ("z", "dec"), ("dec", "map", "$\\hat x$")],
    title="AE-SSIM", ax=axes[0])
schematic({
    "x": (0, 0, "image $x$", "data"),
    "masks": (1, 0, "$k \\times k$ cells in $n$\ndisjoint random masks", "data"),
    "unet": (2, 0, "U-Net inpaints\n$x \\odot M_i$", "trained"),
    "recon": (3, 0, "$\\hat x_k$: each cell from\nthe pass that hid it", "data"),
    "map": (3, 1, "MSGMS$(x, \\hat x_k)$ averaged\nover $k$: map; max: score", "score"),
}, [("x", "masks"), ("masks", "unet"), ("unet", "recon"), ("recon", "map")],
    title="RIAD", ax=axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## SSIM
#
# With local means $\mu_x, \mu_y$, variances $\sigma_x^2, \sigma_y^2$ and covariance $\sigma_{xy}$, all
# computed under a Gaussian window (11 taps, $\sigma = 1.5$), SSIM multiplies a luminance and a
# contrast-structure comparison:
#
# $$\mathrm{SSIM}(x, y) = \frac{2\mu_x\mu_y + C_1}{\mu_x^2 + \mu_y^2 + C_1}\cdot
#   \frac{2\sigma_{xy} + C_2}{\sigma_x^2 + \sigma_y^2 + C_2},$$
#
# $$C_1 = (0.01L)^2,\qquad C_2 = (0.03L)^2,$$
#
# with $L$ the data range.  It is 1 only for identical windows.  **Known answer:** adding a constant
# $b$ to an image changes no variance or covariance, so the second factor is exactly 1 and
# $\mathrm{SSIM} = (2\mu_x(\mu_x + b) + C_1)/(\mu_x^2 + (\mu_x + b)^2 + C_1)$ at every pixel.

# %%
x = torch.rand(1, 1, 48, 48, dtype=torch.float64) * 0.5
b = 0.2
m = ssim_map(x, x + b)
# local mean with the same window and padding, via the SSIM of x with itself's building blocks
from vadlab.nn.similarity import _filter, gaussian_window  # an internal helper, used for this check only

mu = _filter(x, gaussian_window(11, 1.5, x.dtype), "symmetric")
c1 = 0.01 ** 2
expected = (2 * mu * (mu + b) + c1) / (mu ** 2 + (mu + b) ** 2 + c1)
np.testing.assert_allclose(m.numpy(), expected.numpy(), rtol=1e-10)
assert torch.allclose(ssim_map(x, x), torch.ones_like(x))
print("SSIM of a brightness shift: mean", float(m.mean()), "(the contrast-structure term is exactly 1)")

# %% [markdown]
# Our implementation is differentiable torch (it is a training loss), and it agrees with
# scikit-image's reference (`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`),
# which also drops a border of half a window before averaging:

# %%
y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=1.0)
assert abs(float(ssim(x, y)[0]) - ref) < 1e-6
print(f"ours {float(ssim(x, y)[0]):.6f}   scikit-image {ref:.6f}")

# %% [markdown]
# ## Gradient magnitude similarity
#
# RIAD compares *edges*.  With the Prewitt filters $h_x, h_y$ (a 3x3 central difference averaged over
# three rows, i.e. divided by 3) the gradient magnitude of a grey image is
# $g(I) = \sqrt{(I * h_x)^2 + (I * h_y)^2}$ and
#
# $$\mathrm{GMS}(I, I_r) = \frac{2\,g(I)\,g(I_r) + c}{g(I)^2 + g(I_r)^2 + c}, \qquad c = 0.0026 .$$
#
# ($c = 170/255^2$ is the constant of GMSD {cite:p}`xue2014gmsd` for images in [0, 1].)  **Known answer:** a horizontal ramp of
# step $\delta$ has $g = 2\delta$ everywhere inside (the central difference spans two steps), a flat
# image has $g = 0$, so their GMS is $c / (4\delta^2 + c)$.  MSGMS averages $1 - \mathrm{GMS}$ over the
# image and three successive 2x2 average-poolings, so coarse and fine edges both count.

# %%
n = 32
delta = 1 / (n - 1)
ramp = torch.linspace(0, 1, n, dtype=torch.float64).view(1, 1, 1, n).expand(1, 3, n, n)
flat = torch.full_like(ramp, 0.5)
inner = gms_map(ramp, flat)[0, 0, 2:-2, 2:-2]
np.testing.assert_allclose(inner.numpy(), 0.0026 / (4 * delta ** 2 + 0.0026), rtol=1e-6)
assert float(msgms_loss(ramp, ramp)) == 0.0 and float(msgms_loss(ramp, flat)) > 0
print("GMS(ramp, flat) =", float(inner.mean()), " expected", 0.0026 / (4 * delta ** 2 + 0.0026))

# %% [markdown]
# ## Inpainting instead of copying
#
# RIAD cuts the image into cells of $k\times k$ pixels and deals the cells at random into $n = 3$
# sets.  Mask $M_i$ hides set $i$.  A U-Net {cite:p}`ronneberger2015unet` $U$ inpaints each masked image and every pixel is taken
# from the pass that could **not** see it:
#
# $$\hat x = \sum_{i=1}^{n} U(x \odot M_i) \odot (1 - M_i).$$
#
# Because the hidden parts partition the image, every pixel is drawn exactly once and never copied.
# Training draws $k \in \{2, 4, 8, 16\}$ (at 256 px; scaled with the image) per batch and minimises
# $\mathcal L = \mathcal L_2 + \mathcal L_{\mathrm{MSGMS}} + \mathcal L_{\mathrm{SSIM}}$ (all weights 1).
# At test time every $k$ is used and the MSGMS distance maps are averaged, then smoothed with a
# Gaussian ($\sigma = 7$ at 256 px).  The partition property is checked here (and, for every $k$,
# in the test-suite):

# %%
from vadlab.methods.riad import RIAD, cell_sizes, inpainting_masks

masks = inpainting_masks(64, 8, 3, torch.Generator().manual_seed(0))
assert torch.equal((1 - masks).sum(0), torch.ones(1, 64, 64))
fig, axes = plt.subplots(1, 3, figsize=(7, 2.4))
for i, ax in enumerate(axes):
    ax.imshow(masks[i, 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"$M_{i + 1}$ (black = hidden)", fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()
print("cell sizes used at 64 px:", cell_sizes((2, 4, 8, 16), 64))

# %% [markdown]
# ## Copying versus inpainting: a controlled example
#
# The claim of this chapter in one small experiment. The normal images are $32\times32$ grey
# horizontal stripes of period 8 px with a random phase; the test image has one defect, the
# $8\times8$ cell at rows and columns 8 to 15 with its stripes in the opposite phase (every value stays
# in the normal range, only the pattern is wrong there). Two models with the same U-Net of
# `vadlab.methods.riad` (two levels, 8 and 16 channels), the same loss and the same training steps:
#
# - a **plain autoencoder**: the U-Net gets the whole image and must output it;
# - **RIAD** with one cell size $k = 8$: the U-Net only ever sees $x \odot M_i$ and draws the hidden cells.
#
# First the structural fact, on the untrained networks: the output of RIAD at a pixel does not depend on
# any pixel of its own cell (its gradient there is exactly zero), while the autoencoder's does. A
# `RIAD.inpaint` that took each pixel from a pass that saw it would fail this assert.

# %%
from vadlab.methods.ae_ssim import epoch_batches

_ = torch.manual_seed(0)
S, period = 32, 8
rows = torch.arange(S).float()[None, None, :, None]


def stripes(n: int, seed: int) -> torch.Tensor:
    """n grey images [n, 3, S, S]: horizontal stripes of the given period, random phase."""
    phase = 2 * np.pi * torch.rand(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed))
    return (0.5 + 0.25 * torch.sin(2 * np.pi * rows / period + phase)).expand(n, 3, S, S).contiguous()


train_stripes = stripes(64, seed=0)
clean = stripes(1, seed=99)
cell = (slice(None), slice(None), slice(8, 16), slice(8, 16))  # the defective cell
in_cell = torch.zeros(1, 1, S, S, dtype=torch.bool)
in_cell[cell] = True
with_defect = torch.where(in_cell, 1 - clean, clean)  # 1 - stripes = the stripes in the opposite phase

tiny = dict(image_size=S, channels=(8, 16), k_values=(8,), reference_size=S, epochs=30, batch_size=16, lr=1e-2,
            flips=False, sigma=1.0)
riad_tiny, plain = RIAD(**tiny), RIAD(**tiny)  # `plain.net` is trained below as a plain autoencoder
(k_tiny,) = riad_tiny.k_test
test_masks = riad_tiny.test_masks()[k_tiny]


def autoencode(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The U-Net as a plain autoencoder, on the same [-1, 1] scale as RIAD.inpaint."""
    return (net(x * 2 - 1) + 1) / 2


riad_tiny.net.eval()
plain.net.eval()
grads = {}
for name, reconstruct in (("RIAD", lambda x: riad_tiny.inpaint(x, test_masks)),
                          ("plain autoencoder", lambda x: autoencode(plain.net, x))):
    x = with_defect.clone().requires_grad_(True)
    reconstruct(x)[0, :, 12, 12].sum().backward()  # one output pixel inside the cell
    grads[name] = float(x.grad[cell].abs().max())
    print(f"{name}: max |d output(12, 12) / d input| over the pixel's own cell = {grads[name]:.3g}")
assert grads["RIAD"] == 0.0 and grads["plain autoencoder"] > 0

# %% [markdown]
# Now both are trained on the normal stripes: RIAD with its own `fit`, the autoencoder with the same
# loss (`RIAD.loss`), optimiser and number of steps. The assert checks the outcome: the autoencoder
# reproduces the defect (its error in the cell is small, and its output there is far from the clean
# image), while RIAD draws the normal stripes (its output in the cell is close to the clean image, so its
# error there is large).

# %%
riad_tiny.fit([train_stripes])
optimizer = torch.optim.Adam(plain.net.parameters(), lr=tiny["lr"], weight_decay=plain.config.weight_decay)
plain.net.train()
steps = torch.Generator().manual_seed(0)
for epoch in range(tiny["epochs"]):
    for index in epoch_batches(len(train_stripes), tiny["batch_size"], steps):
        batch = train_stripes[index]
        loss = plain.loss(batch, autoencode(plain.net, batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
plain.net.eval()
with torch.no_grad():
    recon_tiny = {"plain autoencoder": autoencode(plain.net, with_defect),
                  "RIAD": riad_tiny.reconstruct(with_defect)[k_tiny]}
error_in_cell, to_clean = {}, {}
for name, r in recon_tiny.items():
    error_in_cell[name] = float((r - with_defect).abs()[cell].mean())
    to_clean[name] = float((r - clean).abs()[cell].mean())
    outside = float((r - with_defect).abs().mean(1)[~in_cell[:, 0]].mean())
    print(f"{name:18s} mean |error| in the defect cell {error_in_cell[name]:.3f}, outside {outside:.3f}; "
          f"distance to the clean image in the cell {to_clean[name]:.3f}")
assert error_in_cell["plain autoencoder"] < 0.5 * error_in_cell["RIAD"]
assert to_clean["RIAD"] < 0.25 * to_clean["plain autoencoder"]

fig, axes = plt.subplots(1, 5, figsize=(12, 2.7))
error_max = max(float((r - with_defect).abs().max()) for r in recon_tiny.values())
axes[0].imshow(with_defect[0, 0], cmap="gray", vmin=0, vmax=1)
axes[0].set_title("test image (defect: cell 8-15)", fontsize=9)
for j, (name, r) in enumerate(recon_tiny.items()):
    axes[1 + 2 * j].imshow(r[0, 0], cmap="gray", vmin=0, vmax=1)
    axes[1 + 2 * j].set_title(f"{name}: output", fontsize=9)
    im = axes[2 + 2 * j].imshow((r - with_defect).abs().mean(1)[0], cmap=CMAP, vmin=0, vmax=error_max)
    axes[2 + 2 * j].set_title(f"{name}: |error|", fontsize=9)
    fig.colorbar(im, ax=axes[2 + 2 * j], fraction=0.046, pad=0.04)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# The autoencoder has learned to reproduce stripes, and a patch of stripes in the opposite phase is still
# stripes: it copies the defect, and its error in the defect cell is less than half of RIAD's (the
# numbers above). RIAD never saw the defective cell when it drew it; it continued the stripes of the
# surrounding cells, so its output there is the clean image and its error map lights up on the defect.

# %% [markdown]
# ## RIAD on a generated texture (a tiny run)
#
# A few epochs on a handful of 64-px brick images, only to see what the pieces look like; the
# numbers of the full pipeline are in the Results chapter, {doc}`results`.

# %%
import tempfile

from vadlab.data import MVTecDataset, generate

root = generate(tempfile.mkdtemp(), seed=0, categories=["brick"], n_train=24, n_test=10, size=64)
train = torch.stack([MVTecDataset(root, "brick", "train", 64)[i]["image"] for i in range(24)])
test_ds = MVTecDataset(root, "brick", "test", 64)
defective = next(test_ds[i] for i in range(len(test_ds)) if test_ds[i]["label"] == 1)

model = RIAD(**{**RIAD.Config.cpu_preset().__dict__, "epochs": 4})
model.fit([train[i:i + 8] for i in range(0, 24, 8)])
image = defective["image"][None]
recons = model.reconstruct(image)
scores, maps = model.predict(image)
assert maps.shape == (1, 64, 64) and all(r.shape == image.shape for r in recons.values())

k = max(recons)
masks = model.test_masks()[k]
fig, axes = plt.subplots(1, 5, figsize=(12, 2.6))
panels = [(image[0], "image"), (image[0] * masks[0], f"$x \\odot M_1$ (k={k})"), (recons[k][0], "inpainted"),
          (None, "MSGMS map"), (defective["mask"], "ground truth")]
for ax, (img, title) in zip(axes, panels):
    if title == "MSGMS map":
        fig.colorbar(ax.imshow(maps[0], cmap=CMAP), ax=ax, fraction=0.046, pad=0.02)
    elif title == "ground truth":
        ax.imshow(img[0], cmap="gray")
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
plt.tight_layout()
plt.show()
print("training loss per epoch:", [round(h["loss"], 3) for h in model.history])

# %% [markdown]
# ## AE-SSIM on the same images
#
# The autoencoder baseline of section 1, fitted the way the pipeline fits it (its small-CPU preset: 32-px
# patches, a 100-dimensional bottleneck vector, SSIM loss), here for 60 epochs on the same 24 bricks, then
# its reconstruction and $1 - \mathrm{SSIM}$ map of the defective brick. With a single vector as the
# bottleneck the reconstruction is a smooth approximation of the texture: it cannot copy the defect, but it
# cannot reproduce the fine normal texture either, so the map lights up on both; its loss falls slowly.

# %%
from vadlab.methods.ae_ssim import AESSIM

ae = AESSIM(**{**AESSIM.Config.cpu_preset().__dict__, "epochs": 60})
ae.fit([train[i:i + 8] for i in range(0, 24, 8)])
ae_losses = [h["loss"] for h in ae.history]
assert np.mean(ae_losses[-10:]) < ae_losses[0], ae_losses  # the SSIM loss falls
_, ae_maps = ae.predict(image)
fig, axes = plt.subplots(1, 4, figsize=(10, 2.6))
axes[0].plot(ae_losses)
axes[0].set(xlabel="epoch", ylabel="1 - SSIM", title="AE-SSIM training")
axes[1].imshow(image[0].permute(1, 2, 0))
axes[1].set_title("defective brick")
axes[2].imshow(ae.reconstruct(image)[0].permute(1, 2, 0).clamp(0, 1))
axes[2].set_title("reconstruction")
fig.colorbar(axes[3].imshow(ae_maps[0], cmap=CMAP), ax=axes[3], fraction=0.046, pad=0.02)
axes[3].set_title("AE-SSIM map")
for ax in axes[1:]:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Results on the generated dataset: see the Results chapter, {doc}`results`.
#
# ## Published numbers and our departures
#
# - **RIAD** on MVTec AD: pixel AUROC 94.2 and pixel AP 48.2 (mean over categories, as reported for RIAD
#   in Table 2 of DRAEM {cite:p}`zavrtanik2021draem`).  No official code exists; an unofficial one
#   (`plutoyuxie/Reconstruction-by-inpainting-for-visual-anomaly-detection`) was read for defaults.
# - **AE-SSIM** on MVTec AD, as re-run in PyramidFlow's Table 3 {cite:p}`lei2023pyramidflow` (12 of the
#   15 categories): pixel AUROC 84.5, AUPRO 67.3.
# - We average the MSGMS maps over $k$ with **equal weights**.  The unofficial code weighs the map of
#   cell size $k$ by $1/N^2$, $N = 256/k$, so $k = 16$ counts 64 times more than $k = 2$; that reads as
#   an artefact, and the paper describes a plain combination.
# - We train a fixed number of epochs (the unofficial code early-stops on a validation split) and do
#   not min-max normalise maps over the test set; MSGMS uses the channel-mean grey image without the
#   unofficial code's 3x3 median pre-filter; cell sizes are scaled with the image size.
# - **AE-SSIM** {cite:p}`bergmann2019aessim` is implemented on RGB with SSIM averaged over channels, and a
#   smoothed map whose maximum is the image score.  As in the paper's texture setting it trains on
#   random patches (the CPU preset: 32-px crops of 64-px images, latent 100) and scores overlapping
#   tiles; trained on whole images with the same budget, its autoencoder barely leaves the "mean
#   image" stage.  Even with patches it stays the weakest method here, which is itself the lesson:
#   reconstruction needs a lot of training, and a blurry reconstruction lights up on every edge.
# - **What the CPU scale costs.**  The pipeline runs both methods at 64 px (`params.yaml`), where a thin
#   1-2 px scratch of the 256-px image is a fraction of a pixel, below what an inpainting or an SSIM window
#   resolves; the example maps of the Results chapter ({doc}`results`) show what is found at that scale.
#   The paper-scale configuration (`configs/mvtec.yaml`: RIAD at 256 px for 300 epochs, AE-SSIM at 128 px
#   for 200) is where these methods should be judged ({doc}`paper_scale`).
#
# ## Summary
#
# - A reconstruction method learns to reproduce normal images and maps the **distance** between an image
#   and its reconstruction; the distance decides what counts as a difference: SSIM compares local
#   luminance, contrast and structure, GMS compares edges, both forgive the blur of a reconstruction
#   better than a squared error.
# - The weakness of a plain autoencoder is that it can **copy** a defect it sees; RIAD never shows the
#   network the pixels it has to draw (disjoint masks, each pixel inpainted from its surroundings).
# - Neither needs a pretrained network or aligned images; both need a long training and many passes at
#   test time (RIAD: one U-Net pass per mask and cell size), and both struggle with defects smaller than
#   what their window or cell resolves.
#
# ## Exercises
#
# 1. *(numerical)* Compute by hand the SSIM of an image with a copy of itself whose contrast is halved
#    around its local mean ($y = \mu_x + (x - \mu_x)/2$) and check it with `ssim_map`. Which factor of the
#    formula changes?
# 2. *(conceptual)* RIAD's masks hide each pixel exactly once. What would go wrong if two masks hid the
#    same pixel, or if some pixel were never hidden?
# 3. *(numerical)* With cell sizes $k \in \{2, 4, 8, 16\}$ and $n = 3$ masks, how many U-Net passes does
#    RIAD need per test image, and how does this grow if you add $k = 32$?
# 4. *(pipeline)* Run `dvc exp run -S 'methods.riad.image_size=128'` and compare with the committed run in
#    `dvc exp show --only-changed`: which defect kinds gain, and what does the fit time cost?
# 5. *(pipeline)* Run `dvc exp run -S '+methods.ae_ssim.set.latent_dim=10'`: does a tighter bottleneck
#    stop the autoencoder from copying defects, or does it only blur the normal images more?
#
# The lab of this chapter, {download}`labs/lab_reconstruction.py` (see {doc}`course_labs`), has you
# implement the SSIM map.

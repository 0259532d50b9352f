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
# # Lab: the SSIM map (reconstruction-based detection)
#
# **Learning goals.** After this lab you can
# - compute the per-pixel SSIM map from five local statistics (two means, two variances, one covariance);
# - explain why an SSIM map highlights a structural defect that a squared-error map drowns in a global
#   brightness change;
# - relate the SSIM window size to the size of the defects that the AE-SSIM method finds in the pipeline.
#
# **Expected time:** 40 minutes (10 reading, 20 exercise, 10 open question).
#
# **Before you start:** read the SSIM section of the chapter *Reconstruction*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch
import torch.nn.functional as F
from skimage import data

from vadlab.labs import check_ssim_map, results_table, show_params, ssim_blur
from vadlab.nn.similarity import ssim_map as package_ssim_map

plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# SSIM compares two images $x, y$ locally, under a Gaussian window $w$ (11 taps, $\sigma = 1.5$). With
# $\mu_x = w * x$, $\sigma_x^2 = w * x^2 - \mu_x^2$ and $\sigma_{xy} = w * (xy) - \mu_x \mu_y$ (all per pixel
# and channel):
#
# $$ \mathrm{SSIM}(x, y) = \frac{(2 \mu_x \mu_y + C_1)(2 \sigma_{xy} + C_2)}
#    {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)}, \qquad C_1 = (0.01 L)^2,\; C_2 = (0.03 L)^2, $$
#
# with $L$ the data range (1 for images in $[0, 1]$). It is 1 for identical patches. The first factor compares
# brightness; the second compares contrast and structure (a correlation).
#
# ## 2. Exercise
#
# Write `ssim_map(x, y, blur, data_range=1.0)` for images $[B, C, H, W]$, returning the SSIM map of the same
# shape. `blur(z)` is given: it returns the Gaussian-weighted local mean $w * z$ of every channel of `z`
# (same shape; `vadlab.labs.ssim_blur`).

# %% tags=["solution"]
def ssim_map(x: torch.Tensor, y: torch.Tensor, blur, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of x and y [B, C, H, W]."""
    # BEGIN SOLUTION
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    # END SOLUTION


# %%
ok = check_ssim_map(ssim_map)

# %% [markdown]
# ## 3. SSIM versus squared error
#
# The "reconstruction" is the camera image; the "test image" is the same image with 30 % more gain everywhere (a
# harmless lighting change) and with a thin dark scratch (the defect).

# %%
img = torch.from_numpy(data.camera()).double()[None, None] / 255.0
img = F.interpolate(img, size=(128, 128), mode="area")
test = (img * 1.3).clamp(0, 1)
test[..., 40:44, 30:100] *= 0.3  # the scratch
sq_err = (test - img)[0, 0] ** 2
dissim = 1 - package_ssim_map(test, img)[0, 0]

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
for ax, m, title in zip(axes, (test[0, 0], sq_err, dissim), ("test image", "squared error", "1 - SSIM")):
    ax.imshow(m, cmap="gray" if title == "test image" else "inferno")
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()
scratch = torch.zeros(128, 128, dtype=torch.bool)
scratch[40:44, 30:100] = True


def contrast(m: torch.Tensor) -> float:
    """How much higher the map is on the scratch than on the rest (ratio of means)."""
    return float(m[scratch].mean() / m[~scratch].mean())


print(f"scratch / background: squared error {contrast(sq_err):.1f}x, 1 - SSIM {contrast(dissim):.1f}x")
assert contrast(dissim) > 1.5 * contrast(sq_err)  # SSIM isolates the scratch far better
if ok:
    npt.assert_allclose(ssim_map(test, img, ssim_blur), package_ssim_map(test, img), atol=1e-10)

# %% [markdown]
# ## 4. Open question: the SSIM window
#
# AE-SSIM trains an autoencoder with the SSIM loss and scores test images with the SSIM map of the input and its
# reconstruction, with an $11 \times 11$ window (`window_size: 11`, `window_sigma: 1.5`).
#
# 1. Predict: with a small window (`window_size: 5, window_sigma: 0.75`), which defects get easier or harder to
#    localise, and how does the map's noise change?
# 2. In `params.yaml` change the AE-SSIM line to
#    `ae_ssim: {image_size: 64, preset: cpu, set: {window_size: 5, window_sigma: 0.75}}`.
# 3. From the repository root run `dvc repro` (the AE-SSIM runs and the tables rerun) and `dvc metrics diff`.
# 4. Rerun the cell below.
#
# **Question.** Explain the change per category (textures versus objects) with what a local statistic over a
# $5 \times 5$ versus an $11 \times 11$ window can measure at 64 px. Note that the window is also the training
# loss's. (Restore the line afterwards.)

# %%
show_params("ae_ssim")
results_table("ae_ssim")

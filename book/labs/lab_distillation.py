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
# # Lab: the multiresolution distillation loss (MKD)
#
# **Learning goals.** After this lab you can
# - write MKD's loss: per layer a value loss (mean squared difference) and a direction loss (one minus the
#   cosine between the whole flattened maps), summed over the layers with the weight $\lambda$;
# - explain why the loss of a student trained on normal images only is an anomaly score, and show that an
#   untrained student's is not;
# - turn the loss into an anomaly map with one backward pass (the gradient with respect to the input);
# - change $\lambda$ in the pipeline and explain its effect on the results table.
#
# **Expected time:** 45 minutes (10 reading, 20 exercise, 15 use and open question).
#
# **Before you start:** read the MKD sections of the chapter *Feature matching and distillation*.

# %%
import tempfile
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import torch

from vadlab.data import MVTecDataset, generate
from vadlab.labs import check_mkd_loss, reference, results_table, show_params
from vadlab.methods.mkd import MKD, MKDConfig
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.filters import gaussian_blur, sigma_for
from vadlab.visualize import CMAP

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# A frozen network pretrained on ImageNet, the **teacher**, describes an image $x$ at $L$ depths:
# $T_1(x), \dots, T_L(x)$ (strides 4, 8, 16, 32). A small **student** (the cloner) is trained on normal images
# only to reproduce them: $C_l(x) \approx T_l(x)$. Per image and layer, MKD measures the disagreement twice:
#
# $$ \mathcal L_{\mathrm{val},l} = \frac{1}{N_l} \sum (C_l - T_l)^2, \qquad
#    \mathcal L_{\mathrm{dir},l} = 1 - \frac{\mathrm{vec}(C_l)^\top \mathrm{vec}(T_l)}
#                                          {\lVert \mathrm{vec}(C_l) \rVert \, \lVert \mathrm{vec}(T_l) \rVert}, $$
#
# where $\mathrm{vec}$ flattens the whole map (channels and positions, $N_l$ numbers), and adds them up:
#
# $$ \mathcal L(x) = \sum_l \mathcal L_{\mathrm{dir},l} + \lambda \sum_l \mathcal L_{\mathrm{val},l}
#    \qquad (\lambda = 0.5 \text{ on MVTec}). $$
#
# The same $\mathcal L(x)$ is the training loss (averaged over a batch) and, at test time, the image score: the
# student learned to imitate the teacher on normal images only, so it disagrees with it on anything else.
#
# ## 2. Exercise
#
# Write `mkd_loss(student_feats, teacher_feats, lamda)`: the two arguments are lists of $L$ maps
# $[B, C_l, H_l, W_l]$ (layer $l$ of the student has the teacher's shape). Return $\mathcal L(x)$ per image,
# a tensor $[B]$ (no mean over the batch).

# %% tags=["solution"]
def mkd_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], lamda: float) -> torch.Tensor:
    """Per-image distillation loss [B]: sum over layers of (1 - cos) + lamda * MSE."""
    # BEGIN SOLUTION
    loss = 0
    for c, t in zip(student_feats, teacher_feats):
        c, t = c.flatten(1), t.flatten(1)  # [B, N_l]: vec() of each image's map
        direction = 1 - torch.nn.functional.cosine_similarity(c, t, dim=1)
        value = (c - t).pow(2).mean(1)
        loss = loss + direction + lamda * value
    return loss
    # END SOLUTION


# %% [markdown]
# Run the check. It prints `PASS` for every case, or what differs and on which input.

# %%
ok = check_mkd_loss(mkd_loss)

# %% [markdown]
# ## 3. The loss separates defective images from normal ones
#
# A small MKD with the package's CPU preset at 64 px (30 epochs, the EfficientNet-Lite0 teacher) fitted on 32
# normal images of a generated texture (a few seconds). Your loss, computed from the student's and the
# teacher's maps of the test images, is the image score.

# %%
loss_fn = mkd_loss if ok else reference("mkd_loss")  # yours once the check passes
root = generate(tempfile.mkdtemp(), seed=0, categories=["brick"], n_train=32, n_test=16, size=64)
train_ds, test_ds = MVTecDataset(root, "brick", "train", 64), MVTecDataset(root, "brick", "test", 64)
train = torch.stack([train_ds[i]["image"] for i in range(len(train_ds))])
test = torch.stack([test_ds[i]["image"] for i in range(len(test_ds))])
labels = np.array([test_ds[i]["label"] for i in range(len(test_ds))])

config = replace(MKDConfig.cpu_preset(), image_size=64)  # the preset trains at 128 px; these images are 64 px
untrained = MKD(config).eval()  # the same student before training (same seed, same initial weights)
model = MKD(config).fit([train[i:i + 16] for i in range(0, len(train), 16)])


def scores(m: MKD, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loss_fn(m.student(m.backbone.normalize(images)), m.teacher(images), m.config.lamda)


trained_scores = scores(model, test)
fig, ax = plt.subplots(figsize=(5, 2.4))
for label, name in ((0, "normal"), (1, "defective")):
    ax.scatter(trained_scores[labels == label], np.full((labels == label).sum(), label), label=name)
ax.set_yticks([0, 1], ["normal", "defective"])
ax.set_xlabel("distillation loss of the trained student")
plt.tight_layout()
plt.show()
auroc_trained = image_auroc(labels, trained_scores.numpy())
print(f"image AUROC of the loss: {auroc_trained:.3f}")
assert auroc_trained > 0.8 and trained_scores[labels == 1].mean() > trained_scores[labels == 0].mean()
if ok:  # your loss is the package's score
    with torch.no_grad():
        npt.assert_allclose(trained_scores, model.loss_per_image(test), rtol=1e-5)

# %% [markdown]
# ## 4. The core idea: the student only learned the teacher on normal images
#
# **Exercise (predict, then run).** Before training, the student is a random network: it disagrees with the
# teacher everywhere. (a) Will the loss of the *untrained* student separate defective from normal images?
# (b) After training, which drops more: the loss on normal images or on defective ones? (c) Which of the four
# layers separates best? Write down your answers, then run the cell.

# %%
untrained_scores = scores(untrained, test)
rows = []
for name, m, s in (("untrained", untrained, untrained_scores), ("trained", model, trained_scores)):
    with torch.no_grad():
        values, directions = m.layer_losses(test)
    per_layer = [image_auroc(labels, (d + m.config.lamda * v).numpy()) for v, d in zip(values, directions)]
    rows.append((name, float(s[labels == 0].mean()), float(s[labels == 1].mean()), image_auroc(labels, s.numpy()),
                 per_layer))
    print(f"{name:>9}: mean loss normal {rows[-1][1]:7.2f}, defective {rows[-1][2]:7.2f}, AUROC {rows[-1][3]:.3f}; "
          f"per layer (strides 4, 8, 16, 32): {', '.join(f'{a:.2f}' for a in per_layer)}")
(_, u_normal, u_defect, u_auroc, _), (_, t_normal, t_defect, t_auroc, _) = rows
assert u_auroc < 0.7 < t_auroc  # only the trained student's disagreement is an anomaly score
assert t_normal / u_normal < t_defect / u_defect  # training lowers the loss on normal images the most

# %% [markdown]
# The untrained student's loss is large on every image and ranks them almost at random. Training lowers it on
# the images the student was shown, the normal ones, by a larger factor than on the defective ones: where the
# image holds something the training set did not, the student never learned to imitate the teacher, and the
# two diverge. That divergence, not the loss itself, is what MKD measures.
#
# ## 5. From the loss to a map: one backward pass
#
# MKD localises with the gradient of the loss with respect to the input pixels, averaged over the colour
# channels, in absolute value: $\big|\tfrac13 \sum_c \partial \mathcal L / \partial x_{c,i,j}\big|$. Autograd
# gives it through your `mkd_loss`.

# %%
index = int(np.argmax(np.where(labels == 1, trained_scores.numpy(), -np.inf)))  # the highest-scored defect
image = test[index:index + 1].clone().requires_grad_(True)
loss = loss_fn(model.student(model.backbone.normalize(image)), model.teacher(image), model.config.lamda)
(grad,) = torch.autograd.grad(loss.sum(), image)
grad_map = grad.mean(1).abs()[0].detach()
smooth = gaussian_blur(grad_map[None], sigma_for(model.config.sigma, 64, model.config.sigma_reference))[0]
mask = test_ds[index]["mask"][0]

fig, axes = plt.subplots(1, 4, figsize=(10, 2.6))
for ax, img, title in zip(axes, (test[index].permute(1, 2, 0), grad_map, smooth, mask),
                          ("image", "|dL/dx| (raw)", "|dL/dx| smoothed", "ground truth")):
    shown = ax.imshow(img, cmap=None if title == "image" else ("gray" if title == "ground truth" else CMAP))
    if title.startswith("|"):
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()
_, package_map = model.gradient_map(test[index:index + 1])
npt.assert_allclose(grad_map, package_map[0], rtol=1e-3, atol=1e-4 * float(package_map.max()))  # float32 rounding
auroc_raw, auroc_smooth = pixel_auroc(mask[None], grad_map[None]), pixel_auroc(mask[None], smooth[None])
print(f"pixel AUROC on this image: raw {auroc_raw:.3f}, smoothed {auroc_smooth:.3f}")
assert auroc_smooth > max(auroc_raw, 0.8)

# %% [markdown]
# The raw gradient is noisy, pixel by pixel; MKD smooths it with a Gaussian ($\sigma = 4$ at 128 px, 2 here at
# 64 px), and the smoothed map finds the defect. The pipeline's CPU preset uses the cheaper
# `localization="discrepancy"` maps (one forward pass, no backward); the chapter compares both.
#
# ## 6. Open question: the weight $\lambda$ of the value loss
#
# The pipeline runs MKD with $\lambda = 0.5$ (the paper's MVTec value).
#
# 1. Predict: with $\lambda = 0$ only the direction loss remains. Which defects can a direction-only student
#    miss? (Hint: the first check cases. What is the direction loss of a student that outputs $2T$?)
# 2. From the repository root run `dvc exp run -S '+methods.mkd.set.lamda=0.0'` (or, equivalently, in
#    `params.yaml` change the MKD line to `mkd: {image_size: 64, preset: cpu, set: {lamda: 0.0}}` and run
#    `dvc repro`; only the MKD runs and the tables rerun).
# 3. Compare in `dvc exp show --only-changed` (or `dvc metrics diff`), then rerun the cell below; then try
#    `lamda: 5.0`.
#
# **Question.** On which categories does the image AUROC move most, and in which direction? Relate it to what
# each term is blind to: the direction loss to the activations' scale, the value loss to the pattern of the
# small activations. (Restore the setting afterwards.)

# %%
show_params("mkd")
results_table("mkd")

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
# # A map of the field
#
# Every method in this book answers the same question: given only images of normal parts, how unusual
# is this new image, and where? They differ in **what they model** of the normal images and in **how
# they measure** a departure from it. This chapter sorts the book's eleven methods into seven families,
# says what each family assumes, what it costs and how it fails, and ends with a rule of thumb for
# choosing one. The chapters then derive each method; the Results chapter ({doc}`results`) measures them
# side by side.
#
# ## Two ways to say "normal"
#
# 1. **Model the distribution of normal features.** A network pretrained on ImageNet
#    {cite:p}`deng2009imagenet` already describes image patches well. Fit a density (or keep the
#    samples) of the normal patches' features; a test patch is anomalous when its features are unlikely.
#    Density on pretrained features, memory banks and flows do this.
# 2. **Model the normal images themselves and compare.** Train a model that turns any input into a
#    *normal* version of it (a reconstruction, an inpainting, a denoised sample, a deformed prototype, a
#    student's imitation of a teacher); the anomaly map is the difference between what came in and what
#    came out. Reconstruction, distillation, deformation and diffusion do this.
#
# The first way needs a good pretrained network and little else; the second needs training and a way
# to stop the model from reproducing the defect too.

# %%
import dataclasses
from collections import Counter

import matplotlib.pyplot as plt
import pandas as pd

from vadlab.methods import available_methods, get_method
from vadlab.report import FAMILIES

plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## The families
#
# The table below is the book's classification (`vadlab.report.FAMILIES`, which the synthesis of
# {doc}`results` also uses); the two columns on the right are **read from the package**: whether the method's
# configuration has a training length (epochs or steps), and whether its default configuration uses a
# pretrained backbone. The cell checks that the classification agrees with
# the code, so a method that starts training or drops its backbone fails the build of this page.

# %%
family_of = {m: f for f, ms in FAMILIES.items() for m in ms}
assert set(family_of) == set(available_methods()), set(available_methods()) ^ set(family_of)


def trains(name: str) -> bool:
    """Whether the method's configuration has a training length (epochs or steps)."""
    fields = [f.name for f in dataclasses.fields(get_method(name).Config)]
    return any("epoch" in f or f.endswith("_steps") for f in fields)


def pretrained(name: str) -> bool:
    """Whether the default configuration uses a pretrained backbone or encoder."""
    config = get_method(name).Config()
    if getattr(config, "variant", None) in ("pdm", "pdm+"):  # DMAD's backbone is only PPDM's encoder
        return False
    backbone = getattr(config, "backbone", None) or getattr(config, "encoder", None)
    return backbone not in (None, "none")


rows = pd.DataFrame([{"method": m, "family": family_of[m], "trains": trains(m),
                      "pretrained network": pretrained(m)} for m in available_methods()])
rows = rows.set_index("method")
# what the chapters say, checked against the code
statistics_only = ["padim", "semi_orthogonal", "patchcore"]
assert not rows.loc[statistics_only, "trains"].any(), "these only fit statistics"
assert rows.drop(statistics_only)["trains"].all()
with_backbone = statistics_only + ["cflow", "favae", "mkd", "diad"]
assert rows.loc[with_backbone, "pretrained network"].all()
assert not rows.drop(with_backbone)["pretrained network"].any()
rows

# %% [markdown]
# (PyramidFlow's default is its paper's fully normalizing-flow baseline, without a pretrained encoder;
# the paper's second variant puts a ResNet-18 stem in front. DiAD's pretrained network only *scores*:
# input and reconstruction are compared in its features. DMAD's default, PDM, trains every network; its
# PPDM variant puts a frozen pretrained encoder behind the deformation module.)
#
# **Density on pretrained features** (PaDiM {cite:p}`defard2021padim`, semi-orthogonal embedding
# {cite:p}`kim2021semiorthogonal`; {doc}`padim`, {doc}`memory_banks`). One Gaussian per feature-grid
# position; the score is a Mahalanobis distance. *Assumes* that images are **aligned** (the same part
# of the object at the same position) and that the pretrained features separate defects from normal
# variation. *Cost*: no training, a covariance per position ($O(d^2)$ memory each, $O(d^3)$ to invert).
# *Fails* when parts move or rotate from image to image (the per-position Gaussian then models pose, not
# appearance), and on defects the ImageNet features do not see.
#
# **Memory bank** (PatchCore {cite:p}`roth2022patchcore`, after SPADE {cite:p}`cohen2020spade`;
# {doc}`memory_banks`). Keep a coreset of all normal patch features; the score is the distance to the
# nearest one. *Assumes* good pretrained features but **not alignment**: any training patch can match any
# test patch. *Cost*: no training; memory and a nearest-neighbour search that grow with the bank.
# *Fails* when a defect looks like some normal patch elsewhere in the image (a missing part whose empty
# spot resembles background), because position is not part of the comparison.
#
# **Normalizing flow** (CFLOW-AD {cite:p}`gudovskiy2022cflow`, PyramidFlow {cite:p}`lei2023pyramidflow`;
# {doc}`normalizing_flows`). An invertible network gives an exact likelihood of the features (CFLOW-AD,
# conditioned on position) or pulls normal latents towards a template (PyramidFlow). *Assumes* enough
# normal data to fit a density. *Cost*: a training run (minutes to hours). *Fails* when training is too
# short (the likelihood is then poorly calibrated across positions) and, for PyramidFlow's template, on
# unaligned images.
#
# **Reconstruction** (AE-SSIM {cite:p}`bergmann2019aessim`, RIAD {cite:p}`zavrtanik2021riad`, FAVAE
# {cite:p}`dehaene2020favae`; {doc}`reconstruction`, {doc}`distillation`). Reproduce the input, in
# pixels or also in pretrained features, and compare. *Assumes* that the model reproduces normal images
# well and defects badly. *Cost*: training from scratch (the longest of the classical methods), and for
# RIAD several passes per test image. *Fails* in both directions: a model that generalises too well
# **copies** the defect, a weak one blurs every normal edge.
#
# **Distillation** (MKD {cite:p}`salehi2021mkd`; {doc}`distillation`). A student imitates a frozen
# teacher on normal images only; where they disagree, the input is unlike the training set. *Assumes*
# the student does **not** generalise its imitation to anomalies. *Cost*: training the student.
# *Fails* when the student is too capable (it imitates the teacher everywhere) or too weak (it disagrees
# everywhere).
#
# **Deformation** (DMAD {cite:p}`liu2023dmad`; {doc}`dmad`). Explain the input as a prototype bent by a
# smooth deformation, and measure both what the deformation cannot explain and how much deformation was
# needed. *Assumes* that normal diversity is mostly geometric (pose, shape). *Cost*: a training run and
# two extra terms to balance. *Fails* when the deformation budget is wrong: too large and it explains
# away defects, too small and pose changes are flagged. Its official MVTec variant, PPDM, puts the
# deformation in front of a frozen pretrained encoder and rebuilds that encoder's features instead of pixels.
#
# **Diffusion** (DiAD {cite:p}`he2024diad`; {doc}`diffusion`). Noise the input and denoise it into a
# normal image with a diffusion model {cite:p}`ho2020ddpm` guided by the input itself; compare in
# pretrained features. The only family here designed for the **multi-class** setting: one model for all
# categories. *Cost*: by far the largest (three training stages, ten denoiser passes per test image).
# *Fails* when the noise level is too low (defects survive) or the guidance too weak (the category or the
# instance is lost).
#
# ## Where each method sits
#
# The figure places the methods by the two distinctions above: what they model (the distribution of
# pretrained features, left, or the images themselves, right) and how much they must train (read from
# the package, as in the table). It is a qualitative map, not a measurement: the Results chapter
# ({doc}`results`) has the measured accuracy and cost.

# %%
COLOURS = dict(zip(FAMILIES, plt.get_cmap("tab10").colors))
# x: 0 = a density of pretrained features ... 1 = a model of the images; one column per family
X = {"density on pretrained features": 0.05, "memory bank": 0.2, "normalizing flow": 0.35,
     "distillation": 0.55, "reconstruction": 0.7, "deformation": 0.85, "diffusion": 0.97}
# y: 0 = statistics only, 1 = a training run, 2 = several training stages (DiAD)
stages = {m: (0 if not rows.loc[m, "trains"] else 2 if m == "diad" else 1) for m in rows.index}
fig, ax = plt.subplots(figsize=(10, 4.8))
# methods of one family at one level are stacked symmetrically around the level, so each stays on its row
group = {m: (family_of[m], stages[m]) for m in rows.index}
size = Counter(group.values())
rank = {}
for method in rows.index:
    family = family_of[method]
    k = rank.setdefault(group[method], 0)
    rank[group[method]] += 1
    y = stages[method] + 0.2 * (k - (size[group[method]] - 1) / 2)
    marker = "o" if rows.loc[method, "pretrained network"] else "s"
    ax.scatter(X[family], y, s=110, color=COLOURS[family], marker=marker, edgecolor="k", zorder=3)
    ax.annotate(method, (X[family], y), xytext=(8, -3), textcoords="offset points", fontsize=9)
for family, x in X.items():
    ax.axvline(x, color=COLOURS[family], alpha=0.15, lw=14, zorder=1)
ax.set_xticks(list(X.values()), [f.replace(" on ", "\non ").replace("normalizing ", "normalizing\n") for f in X],
              fontsize=9)
ax.set_yticks([0, 1, 2], ["no training\n(statistics)", "one training run", "several stages"])
ax.set_xlim(-0.05, 1.12)
ax.set_ylim(-0.4, 2.6)
ax.set_xlabel("models the distribution of pretrained features  ←→  models the images and compares")
ax.scatter([], [], marker="o", color="w", edgecolor="k", label="uses a pretrained network")
ax.scatter([], [], marker="s", color="w", edgecolor="k", label="trained from scratch")
ax.legend(loc="upper left", fontsize=8)
ax.set_title("The book's methods by family")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Which to use when
#
# A rule of thumb, from the assumptions above rather than from any one benchmark:
#
# - **Start with PatchCore or PaDiM.** They need no training, run on a CPU, and on aligned industrial
#   images with a good pretrained backbone they are hard to beat (the published MVTec AD numbers in each
#   chapter and in {doc}`paper_scale` say the same). Prefer PatchCore when parts move between images,
#   PaDiM (or the semi-orthogonal embedding, for many channels) when they are aligned and memory for a
#   patch bank is short.
# - **Use a flow** (CFLOW-AD) when you want a calibrated likelihood per position and can afford a training
#   run; **PyramidFlow** when no pretrained network suits the images (unusual sensors, textures far from
#   ImageNet) and full-resolution maps matter.
# - **Use reconstruction or distillation** when pretrained features are a poor fit and you can train for
#   long; expect to tune what stops the model from reproducing defects.
# - **Use DMAD** when normal parts vary mainly in pose or shape, so that aligned methods flag every
#   rotation.
# - **Use DiAD** (or another multi-class method) when one model must serve many product types; per-class
#   methods trained on a mixed set lose much of their accuracy: PaDiM reaches 95.3 image AUROC on MVTec AD
#   with one model per category {cite:p}`defard2021padim`, and 84.2 when {cite:t}`he2024diad` train it as
#   one model for all 15 categories (their Table 1).
#
# The data sets change the answer too: the generated data of this book, MVTec AD
# {cite:p}`bergmann2019mvtec`, BTAD {cite:p}`mishra2021btad`, VisA {cite:p}`zou2022visa` and the solar
# cells of ELPV {cite:p}`buerhop2018elpv,deitsch2019elpv` reward different families, which is what the
# Results chapters ({doc}`results`, {doc}`paper_scale`) measure.
#
# ## Summary
#
# - Seven families, two ideas: model the **distribution of pretrained features** (density, memory bank,
#   flow), or model the **normal images** and compare (reconstruction, distillation, deformation,
#   diffusion).
# - The first needs a good pretrained network and (except flows) no training; the second needs training
#   and a way to keep the model from reproducing the defect.
# - Alignment, the pretrained features and the single- or multi-class setting decide which family fits a
#   problem; the cost ranges from fitting statistics in seconds to training a diffusion model.
#
# ## Exercises
#
# 1. *(conceptual)* A production line photographs screws in random orientations. Which families' assumptions
#    break, and which method of the book would you try first?
# 2. *(conceptual)* Why can a memory bank miss a *missing* part that a per-position Gaussian catches?
#    Describe the image.
# 3. *(numerical)* PaDiM with $d = 100$ channels on a $32 \times 32$ grid stores one mean and one
#    covariance per position in float32: how many megabytes? PatchCore with a 1 % coreset of 200 images of
#    $32 \times 32$ patches of 152 channels: how many? Compare with the saved model sizes printed in
#    {doc}`padim`.
# 4. *(pipeline)* Run `dvc exp run -S 'run_methods=[padim,patchcore]'` to evaluate only the two
#    training-free methods, and compare their rows with `dvc exp show`: which is more accurate on the
#    object categories, and which on the textures?

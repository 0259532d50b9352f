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
# # Stage `synth`: generate the default dataset
#
# Writes the embedded synthetic dataset (MVTec AD layout) that every other stage reads.
# Run by `dvc repro` through papermill with `-f params.yaml`; the executed copy is kept in `build/exec/`.

# %% tags=["parameters"]
synth = {"root": "build/synthetic", "seed": 0, "n_train": 200, "n_test": 80, "size": 256,
         "categories": ["brick", "grass", "gravel", "screw", "washer", "chip"]}

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from vadlab.data import SYNTH_CATEGORIES, generate

unknown = sorted(set(synth["categories"]) - set(SYNTH_CATEGORIES))
if unknown:
    raise ValueError(f"params.yaml synth.categories lists {unknown}, which the generator does not know; "
                     f"choose from {list(SYNTH_CATEGORIES)}")
root = generate(synth["root"], seed=synth["seed"], categories=synth["categories"], n_train=synth["n_train"],
                n_test=synth["n_test"], size=synth["size"], overwrite=True)
counts = {c: (len(list((root / c / "train" / "good").glob("*.png"))),
              len(list((root / c / "test").glob("*/*.png")))) for c in synth["categories"]}
for c, (n_tr, n_te) in counts.items():
    print(f"{c:8s} train {n_tr:4d}  test {n_te:4d}")
    assert n_tr == synth["n_train"] and n_te == synth["n_test"], f"{c}: unexpected image counts"

# %% [markdown]
# One defective test image per category, with its mask outlined.

# %%
fig, axes = plt.subplots(1, len(synth["categories"]), figsize=(2.2 * len(synth["categories"]), 2.4))
for ax, c in zip(np.atleast_1d(axes), synth["categories"]):
    mask_path = sorted((root / c / "ground_truth").glob("*/*_mask.png"))[0]
    img_path = root / c / "test" / mask_path.parent.name / mask_path.name.replace("_mask", "")
    ax.imshow(Image.open(img_path))
    ax.contour(np.asarray(Image.open(mask_path)) > 0, levels=[0.5], colors="r", linewidths=0.8)
    ax.set_title(f"{c}: {mask_path.parent.name}", fontsize=8)
    ax.axis("off")
fig.tight_layout()
plt.show()

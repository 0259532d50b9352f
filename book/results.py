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
# # Results
#
# Every number and figure on this page is an output of the pipeline (`dvc repro`): stage `synth`
# generates the dataset, `evaluate@<method>-<category>` fits each method on the normal training images of
# one category and scores its test split, `tables` and `figures` aggregate. The settings are in
# `params.yaml`; `dvc.lock` records the exact inputs of each run, and the executed notebooks are in
# `build/exec/`. This page only reads the files, so it always shows the last `dvc repro`.
#
# All methods are evaluated identically: no threshold, epoch or normalisation is chosen on the test set;
# image score and anomaly map come straight from each method's `predict`. Metrics are defined in
# {doc}`data_and_metrics`.

# %%
import os
from pathlib import Path

import pandas as pd
import yaml
from IPython.display import Image, Markdown, display

RESULTS = Path("..") / "results"
ALLOW_MISSING = os.environ.get("VADLAB_BOOK_ALLOW_MISSING_RESULTS") == "1"
params = yaml.safe_load((Path("..") / "params.yaml").read_text())


def pipeline_file(relative: str) -> Path | None:
    """A pipeline output; a clear error if `dvc repro` has not produced it (unless explicitly allowed)."""
    path = RESULTS / relative
    if path.is_file():
        return path
    if ALLOW_MISSING:
        display(Markdown(f"```{{note}}\n`results/{relative}` is missing: run `dvc repro` to produce it.\n```"))
        return None
    raise FileNotFoundError(f"{path} is missing: run `dvc repro` (or `make repro`) before building the book")


display(Markdown(f"Dataset: **{params['data']['name']}** (`{params['data']['root']}`), categories "
                 f"{', '.join(params['data']['categories'])}; methods: {', '.join(params['run_methods'])}."))

# %% [markdown]
# ## Summary: mean over categories
#
# Each category weighs the same. Costs are per category on the machine that ran the pipeline: fit time
# in seconds, prediction time per image in seconds, peak resident memory of the run in MiB, and the number
# of learnt or stored values (a memory bank counts; frozen pretrained backbones do not).

# %%
path = pipeline_file("tables/summary.csv")
if path is not None:
    summary = pd.read_csv(path).set_index("method")
    assert set(summary.index) == set(params["run_methods"]), "tables are stale: run `dvc repro`"
    display(summary.style.format(precision=3, thousands=","))

# %% [markdown]
# ## Per category
#
# Image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) for each method and category.

# %%
for metric, title in (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO")):
    path = pipeline_file(f"tables/{metric}.csv")
    if path is not None:
        display(Markdown(f"**{title}**"))
        display(pd.read_csv(path).set_index("method").style.format("{:.3f}"))

# %%
figure = pipeline_file("figures/metrics_by_category.png")
if figure is not None:
    display(Image(filename=str(figure)))

# %% [markdown]
# ## Example anomaly maps
#
# For each method and category: the highest-scoring defective test images and the highest-scoring
# normal one (last pair of each row), with the ground truth outlined in white.

# %%
for method in params["run_methods"]:
    figure = pipeline_file(f"figures/{method}_examples.png")
    if figure is not None:
        display(Markdown(f"**{method}**"))
        display(Image(filename=str(figure)))

# %% [markdown]
# ## Reproduce or change a result
#
# ```bash
# dvc repro                                     # nothing to do if inputs are unchanged
# dvc exp run -S 'methods.padim.set.ridge=1.0'  # re-runs only the PaDiM stages, tables and figures
# dvc metrics show                              # every metrics.json, and results/summary.json
# ```

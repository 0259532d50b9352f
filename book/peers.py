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
# # Side by side with anomalib
#
# [anomalib](https://github.com/open-edge-platform/anomalib) {cite:p}`akcay2022anomalib` is the library most people reach for when
# they need visual anomaly detection, and three of this book's methods have an anomalib counterpart:
# PaDiM {cite:p}`defard2021padim`, PatchCore {cite:p}`roth2022patchcore` and CFLOW-AD {cite:p}`gudovskiy2022cflow`.  A reimplementation that only reports its own numbers invites the
# question "would the library have done better?", so the pipeline answers it: the optional stage
# `anomalib` fits anomalib's models next to vadlab's, in the same process, on the same images, and this
# page reports what came out, wins and losses alike.
#
# **What is held equal.**  Both libraries get
#
# - the same image tensors (the generated dataset, resized to the stage's image size), in the same order
#   and batch sizes, with seed 0;
# - the same backbone *and weights*: timm's `tf_efficientnet_lite0` with vadlab's offline ImageNet weights
#   copied into anomalib's feature extractor (anomalib would otherwise download from the Hugging Face
#   hub), the same layers;
# - every method setting anomalib exposes, taken from vadlab's configuration by
#   `vadlab.peers.peer_settings` (shown below), and the same Gaussian blur of the maps;
# - the same scoring: the raw image scores and anomaly maps go through `vadlab.metrics` (image AUROC,
#   pixel AUROC, AUPRO up to 30 % FPR).  anomalib's post-processor, which normalises scores with
#   statistics of a validation set that by default *is* the test set, is not used;
# - the same clocks: fit seconds and inference milliseconds per image around the model calls only, and
#   the peak resident memory each run adds (a background sampler, since both run in one process).
#
# anomalib's torch models are driven directly, the way its Lightning `training_step` and `fit` drive
# them, so it is not charged for Lightning Trainer overhead.

# %%
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from IPython.display import Markdown, display

from vadlab import peers
from vadlab.methods import get_method, preset_overrides
from vadlab.report import pipeline_file

params = yaml.safe_load((Path("..") / "params.yaml").read_text())
stage = params.get("anomalib") or {"methods": list(peers.PEER_METHODS), "categories": ["brick"], "image_size": 128}
size = int(stage["image_size"])
dataset = params["data"]["name"]

settings_rows = []
for method in stage["methods"]:
    run = params["methods"][method]
    config = get_method(method).Config(**{**preset_overrides(method, run.get("preset", "paper")),
                                          **(run.get("set") or {})})
    for key, value in peers.peer_settings(method, config, size).items():
        settings_rows.append({"method": method, "setting": key,
                              "value (from vadlab's config)": ", ".join(value) if isinstance(value, list) else value})
display(Markdown(f"Settings passed to anomalib at {size} px (vadlab's `methods.<method>` runs in params.yaml):"))
display(pd.DataFrame(settings_rows).set_index(["method", "setting"]))

# %% [markdown]
# **What differs anyway.**  Some choices are fixed inside anomalib; the comparison keeps anomalib's and
# lists them rather than patching the library.  These lines come from `vadlab.peers.DIFFERENCES`:

# %%
display(Markdown("\n".join(f"- **{m}**: " + "\n- **{m}**: ".format(m=m).join(peers.DIFFERENCES[m])
                           for m in stage["methods"])))

# %% [markdown]
# ## Why CFLOW's anomalib scores are re-normalised
#
# CFLOW turns each scale's log-likelihood map into a probability `exp(log p - m)` and sums the scales.
# anomalib's forward (like the official code) takes `m` as the maximum over the *current batch*, so the
# score of one image depends on which images share its batch.  The stage therefore normalises anomalib's
# log-likelihoods by their maximum over the *training* fibers, as vadlab does, and reports anomalib's
# native scoring separately (the whole test set as one batch, the official code's convention).  A
# two-scale toy shows the effect: the same image gets a different score next to different batch-mates
# under batch normalisation, and the same score under training normalisation.

# %%
rng = np.random.default_rng(0)
image = [rng.normal(-1.0, 0.3, (4, 4)), rng.normal(-1.0, 0.3, (2, 2))]  # per-scale log-likelihood maps
calm = [rng.normal(-1.0, 0.3, (4, 4)), rng.normal(-1.0, 0.3, (2, 2))]
odd = [calm[0] + 2.0, calm[1] - 3.0]  # a batch-mate with an unusually likely first scale


def score(maps, maxima):
    """Image score: max over pixels of K - sum_k exp(logp_k - m_k) (nearest upsampling to the finest grid)."""
    up = [np.kron(m, np.ones((4 // m.shape[0],) * 2)) for m in maps]
    return float(np.max(len(maps) - sum(np.exp(u - mk) for u, mk in zip(up, maxima))))


def batch_maxima(batch):
    return [max(m[k].max() for m in batch) for k in range(2)]


def batch_scores(batch, normalisation):
    """Scores of every image of a batch, the maxima taken from the batch or fixed by the training fibers."""
    maxima = batch_maxima(batch) if normalisation == "batch" else train_maxima
    return [score(maps, maxima) for maps in batch]


train_maxima = [-0.2, -0.2]  # fixed by the training fibers
with_calm, with_odd = batch_scores([image, calm], "batch")[0], batch_scores([image, odd], "batch")[0]
print(f"batch-normalised score of the same image: {with_calm:.3f} next to a calm image, "
      f"{with_odd:.3f} next to an odd one")
assert abs(with_calm - with_odd) > 0.1
# training maxima: the same image scores the same next to either batch-mate ...
trained = batch_scores([image, calm], "train")[0]
assert trained == batch_scores([image, odd], "train")[0]
# ... and the score is the formula, by hand: K - sum_k exp(logp_k - m_k) at the worst fine-grid pixel
by_hand = np.max(2 - np.exp(image[0] - train_maxima[0]) - np.kron(np.exp(image[1] - train_maxima[1]), np.ones((2, 2))))
np.testing.assert_allclose(trained, by_hand, rtol=1e-12)
# the odd batch-mate's first scale raises that scale's batch maximum, and with it the image's score
assert batch_maxima([image, odd])[0] > batch_maxima([image, calm])[0] and with_odd > with_calm

# %% [markdown]
# ## The comparison
#
# `<metric> diff` is vadlab minus anomalib (positive: vadlab more accurate); a cost `ratio` is anomalib
# divided by vadlab (above 1: vadlab faster or lighter).  Mean rows average over the stage's categories.

# %%
try:
    json_path = pipeline_file(f"{dataset}/anomalib/comparison.json")
except FileNotFoundError:
    json_path = None
report = None
if json_path is not None:
    import json

    report = json.loads(json_path.read_text())
how = ("`pip install anomalib==2.7.0 && dvc repro anomalib` (anomalib is optional and not in "
       "requirements.txt; the stage writes a 'skipped' note without it)")
if report is None:
    display(Markdown(f"```{{note}}\nNo comparison yet: run {how}.\n```"))
elif report["status"] != "ok":
    display(Markdown(f"```{{note}}\nThe last `dvc repro` {report['status']}. To fill this page run {how}.\n```"))
else:
    table = pd.read_csv(pipeline_file(f"{dataset}/anomalib/comparison.csv"))
    display(Markdown(f"anomalib {report['anomalib_version']}, torch {report['torch_version']}, "
                     f"{report['torch_threads']} threads, {report['image_size']} px, seed {report['seed']}, "
                     "categories " + "; ".join(f"{m}: {', '.join(c)}" for m, c in report["categories"].items())
                     + f"; stage wall time {report['stage_seconds']:.0f} s."))
    accuracy = table[["method", "category"]
                     + [f"{lib}_{k}" for k in peers.ACCURACY_KEYS for lib in ("vadlab", "anomalib")]
                     + [f"{k}_diff" for k in peers.ACCURACY_KEYS]]
    display(accuracy.set_index(["method", "category"]).round(3))
    costs = table[["method", "category"] + [f"{p}{k}{s}" for k in peers.COST_KEYS
                                            for p, s in (("vadlab_", ""), ("anomalib_", ""), ("", "_ratio"))]]
    display(costs.set_index(["method", "category"]).round(2))

# %% [markdown]
# ## Wins and losses
#
# The sentences below are generated from the table, so they stay true after a rerun.  Timings come from
# a shared two-core machine: compare the ratios (both libraries ran back to back under the same load),
# not the absolute seconds.

# %%
if report is not None and report["status"] == "ok":
    means = table[table["category"] == "mean"].set_index("method")
    lines = []
    for method, row in means.iterrows():
        acc = ", ".join(f"{k.replace('_', ' ')} {row[f'{k}_diff'] * 100:+.1f} points" for k in peers.ACCURACY_KEYS)

        def speed(key, noun):
            r = row[f"{key}_ratio"]
            better = "lighter" if key == "peak_memory_mb" else "faster"
            return f"{noun} {r:.2f}x ({'vadlab' if r > 1 else 'anomalib'} {better})"

        lines.append(f"- **{method}**: accuracy vadlab - anomalib: {acc}; anomalib / vadlab: "
                     f"{speed('fit_seconds', 'fit')}, {speed('infer_ms_per_image', 'inference')}, "
                     f"{speed('peak_memory_mb', 'peak memory')}.")
    display(Markdown("\n".join(lines)))
    if "padim" in means.index:
        # same channels, same covariance ridge (up to anomalib's extra 1e-5), same blur: the same numbers
        assert abs(means.loc["padim", "image_auroc_diff"]) < 0.01 and abs(means.loc["padim", "pixel_auroc_diff"]) < 0.01
    native = report.get("anomalib_native_cflow") or {}
    if native:
        display(Markdown("anomalib's native CFLOW scoring (its own forward, test set as one batch) beside the "
                         "training-normalised scoring used in the table:"))
        cflow = table[table["method"] == "cflow"].set_index("category")
        both = {}
        for key, v in native.items():
            category = key.split("/")[1]
            both[category] = {**{f"native {k}": v[k] for k in peers.ACCURACY_KEYS},
                              **{f"training-normalised {k}": cflow.loc[category, f"anomalib_{k}"]
                                 for k in peers.ACCURACY_KEYS}}
        display(pd.DataFrame(both).T.round(3))

# %% [markdown]
# How to read it:
#
# - **PaDiM** is the control.  Given the same channel subset, both libraries compute the same Gaussian
#   per position and the same Mahalanobis map, so accuracy must agree to rounding (the cell above asserts
#   it); what remains is speed and memory.  anomalib stores every training embedding and then loops over
#   positions to build the covariances, vadlab accumulates sums while streaming, which is why their memory
#   profiles differ.
# - **PatchCore** differs in the coreset (anomalib projects to the Johnson-Lindenstrauss dimension for
#   eps = 0.9, a few hundred dimensions here, vadlab to 128; the first centre differs) and in the map
#   upsampling (nearest against bilinear).  With a 1 % coreset the two memory banks hold different
#   patches, so a point or two of image AUROC either way is within what a different coreset does on 80 test
#   images; the fit-time ratio is mostly the greedy selection.
# - **CFLOW** is the least comparable: different coupling blocks, loss, schedule and fiber sampling, with
#   the same number of passes over the training fibers.  Its row says which training recipe works better
#   under this small budget, not which library is "right".
#
# To rerun: `pip install anomalib==2.7.0 && dvc repro anomalib` (settings in the `anomalib:` block of
# params.yaml; add categories there, at about the cost stated in its comment).

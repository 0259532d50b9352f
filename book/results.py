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
# generates the dataset; `evaluate@<run>` fits one method on the normal training images of each category
# and scores its test split (the per-category protocol); `unified@<run>` fits one model on the normal
# images of all categories together and scores each category (the multi-class protocol of DiAD);
# `digits@<run>` runs the one-class digits protocol; `tables` and `figures` aggregate. The settings are in
# `params.yaml`; `dvc.lock` records the exact inputs of each run, and the executed notebooks are in
# `build/exec/`. This page only reads the files, so it always shows the last `dvc repro`.
#
# All methods are evaluated identically: no threshold, epoch or normalisation is chosen on the test set;
# image score and anomaly map come straight from each method's `predict`. Metrics are defined in
# {doc}`data_and_metrics`.
#
# ```{important}
# These are **small-CPU presets**, not the papers' configurations: the whole pipeline has to run on two
# CPU cores in about an hour, so images are 64 or 128 px instead of 256 px or more, networks trained from
# scratch get a few epochs instead of hundreds, and every method uses the offline EfficientNet-Lite0
# backbone where the papers use ResNet or Wide-ResNet. The table of presets below lists, for every run,
# exactly what its preset changes relative to the paper's defaults. The numbers rank the methods *under
# this budget* on the generated dataset; they are not a replication of the published MVTec AD numbers
# (those are quoted in each method's chapter).
# ```

# %%
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from IPython.display import Image, Markdown, display

from vadlab.methods import get_method, preset_overrides
from vadlab.report import RESULTS, pipeline_file, run_folder

params = yaml.safe_load((Path("..") / "params.yaml").read_text())
RUNS = list(params["run_methods"])
UNIFIED = list(params.get("unified_methods") or [])
DIGIT_RUNS = dict((params.get("digits") or {}).get("runs") or {})


def run_overrides(settings: dict, digits: bool = False) -> tuple[str, dict]:
    """(implementation, hyperparameters that differ from the paper) of one run's settings in params.yaml."""
    name = settings.get("method")
    preset = settings.get("preset", "paper")
    if digits and preset == "digits":
        base = dict(sys.modules[get_method(name).__module__].DIGITS_PRESET)
    else:
        base = preset_overrides(name, preset)
    return name, {**base, **(settings.get("set") or {})}


def describe(name: str, overrides: dict) -> str:
    """'key paper -> preset' for every overridden hyperparameter (the paper's value from the Config defaults)."""
    defaults = {f.name: getattr(get_method(name).Config(), f.name) for f in fields(get_method(name).Config)}
    parts = []
    for key, value in overrides.items():
        paper = defaults.get(key, "?")
        if paper == value or (isinstance(paper, (list, tuple)) and list(paper) == list(value)):
            continue
        fmt = (lambda v: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        parts.append(f"{key} {fmt(paper)} → {fmt(value)}")
    return "; ".join(parts) if parts else "none (the paper's settings)"


presets = []
for run in RUNS + [m for m in UNIFIED if m not in RUNS]:
    settings = params["methods"][run]
    name, overrides = run_overrides({"method": settings.get("method", run), **settings})
    protocols = [p for p, members in (("per-category", RUNS), ("unified", UNIFIED)) if run in members]
    presets.append({"run": run, "method": name, "protocol": ", ".join(protocols),
                    "image size (px)": int(settings["image_size"]), "preset": settings.get("preset", "paper"),
                    "changed from the paper's defaults": describe(name, overrides)})
for run, settings in DIGIT_RUNS.items():
    name, overrides = run_overrides({"method": settings.get("method", run), **settings}, digits=True)
    presets.append({"run": f"{run} (digits)", "method": name, "protocol": "digits",
                    "image size (px)": int(params["digits"]["image_size"]), "preset": settings.get("preset"),
                    "changed from the paper's defaults": describe(name, overrides)})
presets = pd.DataFrame(presets).set_index("run")
label = {k: f"{r['preset']} · {r['image size (px)']} px"
         for k, r in presets[presets.protocol != "digits"].iterrows()}

display(Markdown(f"Dataset: **{params['data']['name']}** (`{params['data']['root']}`), categories "
                 f"{', '.join(params['data']['categories'])}; per-category runs: {', '.join(RUNS)}; "
                 f"unified runs: {', '.join(UNIFIED) or 'none'}; digits runs: {', '.join(DIGIT_RUNS) or 'none'}."))

# %% [markdown]
# ## The presets behind the numbers
#
# `cpu` is each method's documented small-CPU preset (`vadlab.methods.preset_overrides(name, "cpu")`:
# the method's `Config.cpu_preset()` or `CPU_PRESET`), `paper` the dataclass defaults, `digits` the
# module's `DIGITS_PRESET`; `set:` entries in `params.yaml` come on top. The last column is computed from
# the code and `params.yaml` when this page is built, so it cannot drift from what ran (as long as
# `dvc status` is clean). "Image size" is the resolution the method is given; pixel metrics are computed
# at it. DiAD is the one exception to "defaults = the paper's": its dataclass defaults are already a
# small model trained from scratch (about 1 M parameters; `DiADConfig.paper()` gives the paper's
# Stable-Diffusion widths, which the paper fine-tunes rather than trains), see {doc}`diffusion`.

# %%
with pd.option_context("display.max_colwidth", None):
    display(presets.style.set_properties(subset=["changed from the paper's defaults"],
                                         **{"text-align": "left", "white-space": "normal"}))


# %% [markdown]
# ## Summary: mean over categories
#
# Each category weighs the same. The column header under each method gives its preset and image size.
# Every per-category run is repeated with `n_seeds` seeds (`params.yaml`; the seed sets initial weights,
# data order, random channels and projections): a cell reads "mean ± standard deviation over the seeds",
# where the spread of a mean over categories is that of the category-mean across seeds.

# %%
def with_presets(table: pd.DataFrame) -> pd.DataFrame:
    """Columns (run, 'preset · size') so every number stands next to the preset that produced it."""
    table = table.copy()
    table.columns = pd.MultiIndex.from_tuples([(c, label.get(c, "")) for c in table.columns])
    return table


def mean_std(mean: pd.DataFrame, std: pd.DataFrame) -> pd.io.formats.style.Styler:
    """'mean ± std' cells (std over seeds; omitted where there is one seed), the best mean of a row in bold."""
    std = std.reindex_like(mean)
    cells = mean.combine(std, lambda m, d: m.map("{:.3f}".format) + d.map(
        lambda v: "" if pd.isna(v) else f" ± {v:.3f}"))
    best = mean.eq(mean.max(axis=1), axis=0).to_numpy()
    return with_presets(cells).style.apply(lambda _: np.where(best, "font-weight: bold", ""), axis=None)


path = pipeline_file("tables/summary.csv")
if path is not None:
    summary = pd.read_csv(path).set_index("method")
    assert set(summary.index) == set(RUNS), "tables are stale: run `dvc repro`"
    columns = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max"]
    spread = summary.reindex(columns=[f"{c}_std" for c in columns]).set_axis(columns, axis=1)
    display(mean_std(summary[columns].T, spread.T))

# %% [markdown]
# ## Per category, one table per metric
#
# Layout of the papers' tables: categories as rows, methods as columns, the mean over categories in the
# last row. Pixel AUROC, AUPRO (integrated up to a false-positive rate of 0.3, normalised) and pixel AP
# use every test pixel at the method's image size; F1-max is the best F1 over all thresholds (an
# optimistic number: the threshold is the best one on the test set, reported only for comparison with
# the papers, never used to tune anything).

# %%
for metric, title in (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO (FPR ≤ 0.3)"),
                      ("pixel_ap", "Pixel AP"), ("image_f1max", "Image F1-max"), ("pixel_f1max", "Pixel F1-max")):
    path = pipeline_file(f"tables/{metric}.csv")
    if path is not None:
        display(Markdown(f"**{title}** (small-CPU presets, see above)"))
        table = pd.read_csv(path).set_index("category")
        std_path = pipeline_file(f"tables/{metric}_std.csv")
        std = pd.read_csv(std_path).set_index("category") if std_path is not None else table * float("nan")
        display(mean_std(table, std))

# %%
for name in ("heatmap.png", "metrics_by_category.png"):
    figure = pipeline_file(f"figures/{name}")
    if figure is not None:
        display(Image(filename=str(figure)))

# %% [markdown]
# ## Speed and memory
#
# Per category, on the machine that ran the pipeline (two categories at a time, each on one CPU core):
# fit time in seconds, prediction time per image in milliseconds (batches of 16), peak resident memory of
# the worker process in MiB (it includes Python, torch and the data, about 0.5–1 GiB for any method), and
# the number of learnt or stored values in millions (a memory bank or Gaussian statistics count; frozen
# pretrained backbones do not). Fit times of the trained methods are set by their cut-down epoch counts,
# so they say more about the preset than about the method.

# %%
path = pipeline_file("tables/cost.csv")
if path is not None:
    cost = pd.read_csv(path).set_index("method")
    cost.insert(0, "preset", [label.get(m, "") for m in cost.index])
    display(cost.style.format({c: "{:.3f}" if c == "image AUROC" else "{:,.1f}"
                               for c in cost.columns if c not in ("preset", "image size (px)")}))
figure = pipeline_file("figures/accuracy_vs_speed.png")
if figure is not None:
    display(Image(filename=str(figure)))

# %% [markdown]
# Where the pipeline's time goes: the wall-clock seconds of each run's stage (`stage_seconds` in the
# `costs.json` beside its outputs: all its categories and seeds, two at a time on the two cores), on the
# evaluated data (`evaluate@<run>`, `unified@<run>`; the generated set by default) and on ELPV
# (`elpv_evaluate@<run>`). Not counted: the few seconds each stage spends starting Python and the
# notebook, and the small stages (data, tables, figures, digits).

# %%
def stage_seconds(relative: str) -> float | None:
    path = pipeline_file(relative)
    return None if path is None else float(json.loads(path.read_text())["stage_seconds"])


dataset = params["data"]["name"]
stages = pd.DataFrame({
    f"{dataset} (s)": {r: stage_seconds(f"{dataset}/{r}/costs.json") for r in RUNS}
    | {f"{r} (unified)": stage_seconds(f"{dataset}/unified/{r}/costs.json") for r in UNIFIED},
    "ELPV (s)": {r: stage_seconds(f"elpv/{r}/costs.json") for r in RUNS},
})
stages.loc["total"] = stages.sum(min_count=1)
stages["total (s)"] = stages.sum(axis=1, min_count=1)
display(stages.style.format("{:,.0f}", na_rep="—"))

# %% [markdown]
# ## Did the trained methods converge?
#
# Every method that trains a network logs its training loss (`history`: per epoch; DiAD per optimiser
# step and stage), and the pipeline saves it as `history.csv` beside each run's metrics. The curves
# below are the runs of seed `seed` (`params.yaml`) on every category, one line per category (a unified
# run is one model, so one line). Each line is rescaled to [0, 1] (its lowest value to 0, its highest to
# 1), so that categories and methods share one axis whatever the loss's units or sign (the flows'
# negative log-likelihoods are negative). These are training losses on normal images only; no test image
# is involved.
#
# The table condenses each curve into one number: the share of the whole decrease of the loss that
# happened in the last fifth of training (the mean loss over the last fifth against the mean over the
# fifth before it, divided by the drop from the first value to the last fifth). A converged run is near
# 0 % (noise can make it negative); a loss falling at a steady rate gives 20 % or more, one that decays
# geometrically a few percent; a dash means the loss never fell below its first value (a stage that
# starts from trained weights). We call a run still falling above 2 %. With fewer than ten epochs the
# last fifth is a single epoch, so the number is coarse; the curves show the rest. A run still falling
# at the end is bounded by the time budget of its preset, not converged: its accuracy is a lower bound
# on what the method does with more training.

# %%
import matplotlib.pyplot as plt

SEED, DATA, CATEGORIES = params["seed"], params["data"]["name"], list(params["data"]["categories"])


def late_share(loss: np.ndarray) -> float:
    """Share of the loss decrease (first value -> mean of the last fifth) that came in the last fifth."""
    tail = max(1, round(len(loss) / 5))
    last, before = loss[-tail:].mean(), loss[-2 * tail:-tail].mean()
    total = loss[0] - last
    return float((before - last) / total) if total > 0 else float("nan")


training: dict[str, dict[str, np.ndarray]] = {}  # "run" or "run (stage)" -> category -> losses
missing = None
for run, unified in [(r, False) for r in RUNS] + [(r, True) for r in UNIFIED]:
    for category in CATEGORIES:
        folder = run_folder(DATA, run, category, SEED, unified)
        if not (RESULTS / folder / "metrics.json").is_file():
            missing = missing or folder / "metrics.json"
            continue
        path = RESULTS / folder / "history.csv"
        if not path.is_file():  # Gaussians and memory banks train nothing
            continue
        history = pd.read_csv(path)
        name = f"unified-{run}" if unified else run
        stages = history.groupby("stage", sort=False) if "stage" in history else [(None, history)]
        for stage, part in stages:
            if len(part) >= 2:
                key = f"{name} ({stage})" if stage is not None else name
                if not (unified and key in training):  # a unified run's categories share one model
                    training.setdefault(key, {})[category] = part["loss"].to_numpy(dtype=float)
if missing is not None:
    pipeline_file(str(missing))

if training:
    rows = []
    for key, per_category in training.items():
        shares = 100 * np.array([late_share(loss) for loss in per_category.values()])
        finite = shares[np.isfinite(shares)]
        rows.append({"run (stage)": key, "epochs or steps": max(len(v) for v in per_category.values()),
                     "decrease in the last fifth, mean (%)": finite.mean() if finite.size else np.nan,
                     "largest category (%)": finite.max() if finite.size else np.nan})
    converge = pd.DataFrame(rows).set_index("run (stage)")
    display(converge.style.format("{:.1f}", subset=[c for c in converge.columns if "%" in c], na_rep="—"))
    falling = converge.index[converge["decrease in the last fifth, mean (%)"] > 2].tolist()
    display(Markdown(f"Still falling at the end (more than 2 % of their decrease in the last fifth): "
                     f"**{', '.join(falling) or 'none'}**; the others have flattened out."))

    columns = 4
    fig, axes = plt.subplots(-(-len(training) // columns), columns, squeeze=False,
                             figsize=(2.6 * columns, 1.9 * -(-len(training) // columns)))
    for ax, (key, per_category) in zip(axes.flat, training.items()):
        for category, loss in per_category.items():
            ax.plot(np.arange(1, len(loss) + 1), (loss - loss.min()) / max(np.ptp(loss), 1e-12),
                    lw=1 if len(loss) < 100 else 0.4, label=category)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in axes.flat[len(training):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("epoch (DiAD: optimiser step)", fontsize=8)
    fig.supylabel("training loss, rescaled to [0, 1]", fontsize=8)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Anomaly maps side by side
#
# Two defective test images per category, fixed in advance (not chosen by any method's score), with the
# ground truth outlined, and every method's anomaly map on them; `(u)` marks the unified runs. One colour
# scale per method and category (display only).

# %%
figure = pipeline_file("figures/maps_grid.png")
if figure is not None:
    display(Image(filename=str(figure)))

# %% [markdown]
# ## Multi-class (unified) protocol
#
# One model is fitted on the normal training images of all categories together and then scores each
# category's test split without being told the category: DiAD's setting. PaDiM and PatchCore run the
# same way for comparison (their per-position Gaussians and memory bank then mix every category). The
# second table puts each unified run next to the same method fitted per category (means over categories;
# fit time: the one unified model against the sum of the per-category models).

# %%
for metric, title in (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("aupro", "AUPRO"),
                      ("pixel_ap", "Pixel AP")):
    path = pipeline_file(f"tables/unified_{metric}.csv")
    if path is not None:
        display(Markdown(f"**{title}, unified** (small-CPU presets)"))
        display(with_presets(pd.read_csv(path).set_index("category")).style.format("{:.3f}"))
path = pipeline_file("tables/unified_vs_per_category.csv")
if path is not None:
    display(Markdown("**Unified against per-category** (means over categories)"))
    display(pd.read_csv(path).set_index(["method", "protocol"]).style.format("{:.3f}")
            .format({"fit_seconds": "{:.0f}", "models": "{:.0f}"}))

# %% [markdown]
# ## One-class digits protocol
#
# DMAD's MNIST protocol on scikit-learn's 8x8 digits (offline; upsampled to the preset's image size):
# train on one digit, score every test digit, image AUROC of the other digits against it (30 % of each
# digit held out for testing, split seeded). The seed paper lists MNIST among its datasets but the
# sources at hand give no per-digit numbers to compare with; these runs use the digits preset listed above.

# %%
path = pipeline_file("tables/digits.csv")
if path is not None:
    display(pd.read_csv(path).set_index("digit").style.format("{:.3f}"))

# %% [markdown]
# ## Example anomaly maps per method
#
# For each method and category: the highest-scoring defective test images and the highest-scoring
# normal one (last pair of each row), with the ground truth outlined in white.

# %%
for run in RUNS:
    figure = pipeline_file(f"figures/{run}_examples.png")
    if figure is not None:
        display(Markdown(f"**{run}** ({label.get(run, '')})"))
        display(Image(filename=str(figure)))

# %% [markdown]
# ## Real images: ELPV solar cells
#
# Everything above is on generated images. The pipeline also runs every per-category run on real
# inspection images: the ELPV dataset of electroluminescence images of solar cells (2,624 cells of 300x300
# px, 8-bit grayscale, from 44 modules), which installs offline from PyPI as `elpv-dataset`. Each cell
# carries an expert defect probability in {0, 1/3, 2/3, 1} and its module type (monocrystalline `mono`
# or polycrystalline `poly`, the two categories here). Dataset licence: CC BY-NC-SA 4.0 (non-commercial,
# share alike). The benchmark is {cite:t}`buerhop2018elpv`; the cells and their labels are described by
# {cite:t}`deitsch2019elpv`.
#
# Stage `elpv_data` (`vadlab data elpv`, {py:func}`vadlab.data.elpv.write_elpv`) writes it in MVTec
# layout: the p = 0 cells of each module type are permuted with a fixed seed and split 80/20 into
# `train/good` and `test/good`, every p = 1 cell goes to `test/defective`, and the uncertain 1/3 and 2/3
# cells to a separate `graded/` set. There are **no pixel masks**: `test/defective` has no
# `ground_truth/` folder, so the loader reads it with image labels only and every pixel metric is absent
# (null in the JSON, an em dash in the tables) with the reason stated, never computed on invented masks.
# The maps below can only be judged by eye against the visible cracks and dark (inactive) areas.
#
# To fit the pipeline's one-hour budget on two CPU cores, the ELPV runs use one seed, the same preset and
# image size per run as on the generated data, and at most `elpv.max_train` training cells per module
# type (the first ones of the same seeded permutation; the test set is complete). These settings were
# fixed from the measured cost alone, never from a test result. Stages `elpv_evaluate@<run>` and
# `elpv_report` write `results/elpv/` and `results/elpv_report/`.

# %%
ELPV = params["elpv"]
from vadlab.data.elpv import elpv_cells, elpv_split

_cells = elpv_cells()
_counts = pd.DataFrame({c: {k: len(v) for k, v in elpv_split(_cells, c, ELPV["seed"], ELPV["train_fraction"],
                                                             ELPV["max_train"]).items()}
                        for c in ELPV["categories"]}).T
_counts.index.name = "module type"
display(Markdown(f"Cells per folder (`elpv.seed` {ELPV['seed']}, train fraction {ELPV['train_fraction']}, "
                 f"cap {ELPV['max_train']} training cells, {ELPV['n_seeds']} seed):"))
display(_counts)

elpv_summary_path = pipeline_file("elpv_report/tables/summary.csv", RESULTS)
if elpv_summary_path is not None:
    elpv_summary = pd.read_csv(elpv_summary_path).set_index("method")
    assert set(elpv_summary.index) == set(RUNS), "ELPV tables are stale: run `dvc repro`"
    shown = elpv_summary[[f"image_auroc_{c}" for c in ELPV["categories"]] + ["image_auroc", "image_ap",
                         "pixel_auroc", "aupro", "graded_spearman", "spearman_all", "generated_image_auroc",
                         "rank_elpv", "rank_generated"]]
    display(Markdown("**ELPV: image metrics per run** (one seed; pixel metrics absent: no masks)"))
    display(with_presets(shown.T).style.format(lambda v: "—" if pd.isna(v) else f"{v:.3f}"))

# %% [markdown]
# ### What carries over from generated to real images, and what does not
#
# The numbers in this subsection are read from the tables above when the page is built.

# %%
if elpv_summary_path is not None:
    from scipy.stats import spearmanr

    s = elpv_summary
    rank_rho = float(spearmanr(s["image_auroc"], s["generated_image_auroc"]).statistic)
    best_real, best_gen = s["image_auroc"].idxmax(), s["generated_image_auroc"].idxmax()
    cats = ELPV["categories"]
    harder = min(cats, key=lambda c: s[f"image_auroc_{c}"].mean())
    drop = (s["generated_image_auroc"] - s["image_auroc"])
    feature = [r for r in RUNS if params["methods"][r]["image_size"] >= 128]
    scratch = [r for r in RUNS if r not in feature]
    bullets = [
        f"**Ranking.** The Spearman correlation between the runs' mean image AUROC on the generated data and "
        f"on ELPV is {rank_rho:.2f} over {len(s)} runs. Best on the generated data: `{best_gen}` "
        f"({s.loc[best_gen, 'generated_image_auroc']:.3f} generated, {s.loc[best_gen, 'image_auroc']:.3f} ELPV); "
        f"best on ELPV: `{best_real}` ({s.loc[best_real, 'image_auroc']:.3f}).",
        f"**Feature-based against trained from scratch.** Mean ELPV image AUROC of the runs on pretrained "
        f"features at 128 px ({', '.join(feature)}): {s.loc[feature, 'image_auroc'].mean():.3f}; of the networks "
        f"trained from scratch at 64 px ({', '.join(scratch)}): {s.loc[scratch, 'image_auroc'].mean():.3f} "
        f"(generated data: {s.loc[feature, 'generated_image_auroc'].mean():.3f} and "
        f"{s.loc[scratch, 'generated_image_auroc'].mean():.3f}).",
        f"**Module types.** `{harder}` is the harder category: mean image AUROC over runs "
        + ", ".join(f"{c} {s['image_auroc_' + c].mean():.3f}" for c in cats) + "."
        + (" Polycrystalline cells show a grain texture that differs from cell to cell, so the normal "
           "variation a model must absorb is larger than on the uniform monocrystalline cells."
           if harder == "poly" else ""),
        f"**Level.** Generated minus ELPV image AUROC: {drop.mean():+.3f} on average (largest: "
        f"`{drop.idxmax()}`, {drop.max():+.3f}; smallest: `{drop.idxmin()}`, {drop.min():+.3f}). The generated "
        "defects are drawn to be visible; real cracks are thin, a few pixels wide at 300 px, and shrink "
        "further at the 64 or 128 px the presets use.",
        "**What cannot carry over.** Localisation: without masks there is no pixel AUROC or AUPRO on ELPV, so "
        "the generated data's pixel results have no real-image counterpart here; the maps can only be read by eye.",
        f"**Graded cells.** Spearman correlation of score and probability within the 1/3 and 2/3 cells, mean over "
        f"runs and module types: {s['graded_spearman'].mean():.2f} (range {s['graded_spearman'].min():.2f} to "
        f"{s['graded_spearman'].max():.2f}); over all four levels 0, 1/3, 2/3, 1: {s['spearman_all'].mean():.2f}. "
        "A score that separates p = 0 from p = 1 need not order the uncertain cells between them.",
    ]
    display(Markdown("\n".join(f"- {b}" for b in bullets)))

# %% [markdown]
# ### Figures on real cells
#
# Anomaly maps of every run on the same cells (two p = 1 and one p = 0 per module type, fixed by file
# name in advance); score histograms of the normal and defective test cells; and the mean score
# percentile per defect probability level, which asks whether the score follows the annotators'
# confidence on the cells kept out of the main protocol.

# %%
for name in ("maps_grid.png", "score_histograms.png", "graded.png"):
    figure = pipeline_file(f"elpv_report/figures/{name}", RESULTS)
    if figure is not None:
        display(Image(filename=str(figure)))

# %% [markdown]
# ## Synthesis
#
# What the tables on this page say, family by family (the families of {doc}`overview`). Every sentence
# below is computed from the pipeline's tables when the page is built
# ({py:func}`vadlab.report.synthesis`), so it stays true after the next `dvc repro`; read it with the
# caveat at the top of the page: these are small-CPU presets.

# %%
_summary_path = pipeline_file("tables/summary.csv")
if _summary_path is not None:
    from vadlab.report import synthesis

    _summary = pd.read_csv(_summary_path).set_index("method")
    _unified_path = pipeline_file("tables/unified_vs_per_category.csv")
    _elpv_path = pipeline_file("elpv_report/tables/summary.csv", RESULTS)
    _sentences = synthesis(
        _summary, _summary["implementation"].to_dict(),
        elpv=pd.read_csv(_elpv_path).set_index("method") if _elpv_path is not None else None,
        unified=pd.read_csv(_unified_path).set_index("method") if _unified_path is not None else None)
    display(Markdown("\n".join(f"- {s}" for s in _sentences)))

# %% [markdown]
# ## Reproduce or change a result
#
# ```bash
# dvc repro                                     # nothing to do if inputs are unchanged
# dvc exp run -S 'methods.padim.set.ridge=1.0'  # re-runs only evaluate@padim, unified@padim,
#                                               # elpv_evaluate@padim, tables, figures, elpv_report
# dvc metrics show                              # results/summary.json and every run's metrics file
# ```
#
# `jobs` in `params.yaml` sets how many categories (or digits) of one stage run at once, in separate
# processes that share the CPU threads; it changes the wall-clock time, not the numbers.

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
# # Stage `tables`: aggregate every run's metrics into CSV and markdown tables
#
# Reads `results/<dataset>/<run>/<category>/seed<k>/metrics.json` (per-category protocol, one per seed),
# `results/<dataset>/unified/<run>/<category>/metrics.json` (multi-class protocol) and
# `results/digits/<run>.json` (one-class digits) for the runs selected in `params.yaml`, and writes
# `results/tables/` (read by the book) and `results/summary.json` (a DVC metric: means per run).
#
# Layout of the seed papers' tables: one table per metric, categories as rows, methods as columns, and a
# last row with the mean over categories (each category weighs the same). The per-category runs are
# repeated with `n_seeds` seeds: `<metric>.csv` holds the means over seeds, `<metric>_std.csv` the sample
# standard deviations over seeds, and `<metric>.md` both as "mean ± std". The spread of the mean row is
# that of the category-mean across seeds (not an average of per-category spreads).

# %% tags=["parameters"]
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
seed = 0
n_seeds = 1
run_methods = ["padim"]
unified_methods = []
digits = {"image_size": 32, "digits": list(range(10)), "runs": {}}
methods = {"padim": {"image_size": 256, "preset": "paper"}}
results_root = "results"

# %%
import json
from pathlib import Path

import pandas as pd

from vadlab.evaluate import write_json

METRICS = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max"]
COSTS = ["fit_seconds", "predict_seconds_per_image", "peak_memory_mb", "n_parameters"]
root = Path(results_root)
tables = root / "tables"
tables.mkdir(parents=True, exist_ok=True)
categories = list(data["categories"])
seeds = [int(seed) + k for k in range(int(n_seeds))]


def collect(base: Path, runs: list[str], protocol: str, seeds: list[int] | None = None) -> pd.DataFrame:
    """One row per (run, category, seed) from ``base/<run>/<category>[/seed<k>]/metrics.json``.

    ``seeds=None``: one run per category, directly in ``<category>/`` (the unified protocol). A clear error
    names the missing files.
    """
    rows, missing = [], []
    for run in runs:
        for category in categories:
            for s in seeds if seeds is not None else [int(seed)]:
                path = base / run / category / (f"seed{s}" if seeds is not None else "") / "metrics.json"
                if not path.is_file():
                    missing.append(str(path))
                    continue
                m = json.loads(path.read_text())
                rows.append({"dataset": data["name"], "protocol": protocol, "method": run,
                             "implementation": m.get("method", run), "category": category, "seed": s,
                             "image_size": m.get("image_size"), **{k: m.get(k) for k in METRICS + COSTS}})
    if missing:
        raise FileNotFoundError(f"metrics missing for {len(missing)} runs, e.g. {missing[:3]}: run `dvc repro`")
    frame = pd.DataFrame(rows)
    if len(frame):
        frame[METRICS + COSTS] = frame[METRICS + COSTS].astype(float)
    return frame


def by_category(frame: pd.DataFrame, metric: str, runs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) over seeds: categories as rows, runs as columns, plus the mean row (the papers' layout).

    The mean row is the mean over categories of each seed, then its mean and standard deviation over the
    seeds. The standard deviation is NaN where a run has one seed.
    """
    def pivot(values: pd.Series) -> pd.DataFrame:
        table = values.unstack("method").reindex(columns=runs)
        table.index.name, table.columns.name = "category", None
        return table

    by_seed = frame.groupby(["category", "method", "seed"])[metric].first()
    mean = pivot(by_seed.groupby(["category", "method"]).mean()).reindex(index=categories)
    std = pivot(by_seed.groupby(["category", "method"]).std(ddof=1)).reindex(index=categories)
    category_mean = frame.groupby(["method", "seed"])[metric].mean()
    mean.loc["mean"] = category_mean.groupby("method").mean().reindex(runs)
    std.loc["mean"] = category_mean.groupby("method").std(ddof=1).reindex(runs)
    return mean, std


def to_markdown(df: pd.DataFrame, digits: int = 3, std: pd.DataFrame | None = None) -> str:
    """GitHub-flavoured markdown table with fixed decimals; "mean ± std" cells where ``std`` is given.

    A missing value (a pixel metric of a dataset without pixel masks) is an em dash, never "nan".
    """
    if std is not None:
        cells = [["—" if pd.isna(m) else f"{m:.{digits}f}" + ("" if pd.isna(d) else f" ± {d:.{digits}f}")
                  for m, d in zip(rm, rd)] for rm, rd in zip(df.to_numpy(), std.reindex_like(df).to_numpy())]
        return pd.DataFrame(cells, index=df.index, columns=df.columns).to_markdown() + "\n"
    return df.astype(object).where(df.notna(), None).to_markdown(floatfmt=f".{digits}f", missingval="—") + "\n"


def write(df: pd.DataFrame, name: str, digits: int = 3, std: pd.DataFrame | None = None) -> None:
    df.to_csv(tables / f"{name}.csv", float_format="%.6g")
    if std is not None:
        std.to_csv(tables / f"{name}_std.csv", float_format="%.6g")
    (tables / f"{name}.md").write_text(to_markdown(df, digits, std))


per_category = collect(root / data["name"], list(run_methods), "per-category", seeds)
per_category.to_csv(tables / "per_category.csv", index=False, float_format="%.6g")
per_category.head()

# %% [markdown]
# ## Per-category protocol: one table per metric

# %%
for metric in METRICS:
    mean, std = by_category(per_category, metric, list(run_methods))
    write(mean, metric, std=std)
by_category(per_category, "image_auroc", list(run_methods))[0].round(3)

# %% [markdown]
# ## Summary and cost: means over categories (and seeds)
#
# `<metric>_std`: the standard deviation over seeds of the category-mean. Costs per category (one model):
# fit seconds, prediction seconds per image, peak resident memory of the process in MiB, and parameters
# (learnt weights and stored statistics or memory banks; frozen pretrained backbones excluded).

# %%
summary = (per_category.groupby("method", sort=False)[METRICS + COSTS].mean().reindex(run_methods))
summary.insert(0, "image_size",
               per_category.groupby("method", sort=False)["image_size"].first().reindex(run_methods))
summary.insert(0, "implementation",
               per_category.groupby("method", sort=False)["implementation"].first().reindex(run_methods))
category_mean = per_category.groupby(["method", "seed"])[METRICS].mean()
summary = summary.join(category_mean.groupby("method").std(ddof=1).add_suffix("_std"))
summary.index.name = "method"
summary.to_csv(tables / "summary.csv", float_format="%.6g")
(tables / "summary.md").write_text(to_markdown(summary))

cost = pd.DataFrame({
    "image size (px)": summary["image_size"].astype(int),
    "fit (s per category)": summary["fit_seconds"],
    "inference (ms per image)": 1000 * summary["predict_seconds_per_image"],
    "peak memory (MiB)": summary["peak_memory_mb"],
    "parameters (M)": summary["n_parameters"] / 1e6,
    "image AUROC": summary["image_auroc"],
})
write(cost, "cost", 2)
cost.round(2)

# %% [markdown]
# ## Multi-class (unified) protocol

# %%
unified = collect(root / data["name"] / "unified", list(unified_methods), "unified")
unified.to_csv(tables / "unified_per_category.csv", index=False, float_format="%.6g")
if len(unified):
    for metric in METRICS:
        write(by_category(unified, metric, list(unified_methods))[0], f"unified_{metric}")
    # the same methods fitted per category, next to their unified mean (what one model for all costs)
    both = [m for m in unified_methods if m in run_methods]
    rows = []
    for m in unified_methods:
        rows.append({"method": m, "protocol": "unified", **unified[unified.method == m][METRICS].mean().to_dict(),
                     "fit_seconds": float(unified[unified.method == m]["fit_seconds"].iloc[0]),
                     "models": 1})
        if m in both:
            sep = per_category[per_category.method == m]
            rows.append({"method": m, "protocol": "per-category", **sep[METRICS].mean().to_dict(),
                         "fit_seconds": float(sep.groupby("seed")["fit_seconds"].sum().mean()),
                         "models": len(categories)})
    comparison = pd.DataFrame(rows).set_index("method")
    write(comparison, "unified_vs_per_category")
    display_table = by_category(unified, "image_auroc", list(unified_methods))[0].round(3)
else:
    display_table = None
display_table

# %% [markdown]
# ## One-class digits protocol

# %%
digit_runs = list(digits.get("runs") or {})
columns = {}
for run in digit_runs:
    path = root / "digits" / f"{run}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro`")
    r = json.loads(path.read_text())
    columns[run] = {int(d): float(a) for d, a in r["image_auroc"].items()}
digits_table = pd.DataFrame(columns).reindex(index=[int(d) for d in digits["digits"]], columns=digit_runs)
digits_table.index.name = "digit"
if digit_runs:
    digits_table.loc["mean"] = digits_table.mean(axis=0)
    write(digits_table, "digits")
digits_table.round(3)

# %%
dvc_metrics = {
    "dataset": data["name"],
    "per_category": {m: {k: round(float(v), 6) for k, v in r.items()} for m, r in summary[METRICS].iterrows()},
    "unified": ({m: {k: round(float(v), 6) for k, v in unified[unified.method == m][METRICS].mean().items()}
                 for m in unified_methods} if len(unified) else {}),
    "digits": {run: round(float(digits_table.loc["mean", run]), 6) for run in digit_runs},
}
write_json(root / "summary.json", dvc_metrics)  # a DVC metric (tracked by git)
print(sorted(p.name for p in tables.iterdir()))

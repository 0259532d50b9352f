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
# # Stage `anomalib`: vadlab's PaDiM, PatchCore and CFLOW side by side with anomalib's
#
# `dvc repro anomalib` runs this notebook with papermill (`-f params.yaml`).  For every method of
# `anomalib.methods` and category of `anomalib.categories` it fits vadlab's method (the settings of
# `methods.<method>` in params.yaml, as in the `evaluate` stage) and then anomalib's counterpart with the
# same settings (`vadlab.peers.peer_settings`), back to back in this process, on the same image tensors
# at `anomalib.image_size` px, seed `seed`.  Both are scored with `vadlab.metrics`; fit seconds,
# inference milliseconds per image and the peak resident memory added by each run are measured the same
# way for both.  Writes `results/<dataset>/anomalib/comparison.csv` (one row per method and category,
# plus a mean row per method) and `comparison.json` (the same rows, the settings, what differs, anomalib's
# native CFLOW scoring, the stage's wall time).
#
# anomalib is optional (`pip install anomalib==2.7.0`; it is not in requirements.txt).  Without it the
# stage finishes at once and both files say `skipped: anomalib not installed`.

# %% tags=["parameters"]
seed = 0
data = {"name": "synthetic", "root": "build/synthetic", "categories": ["brick"]}
methods = {"padim": {"image_size": 128, "preset": "paper", "set": {}},
           "patchcore": {"image_size": 128, "preset": "cpu"},
           "cflow": {"image_size": 128, "preset": "cpu"}}
anomalib = {"methods": ["padim", "patchcore", "cflow"], "categories": ["brick"], "image_size": 128, "batch_size": 16}
results_root = "results"

# %%
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of both libraries would flood the executed notebook

import json
import time
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

from vadlab import peers
from vadlab.methods import preset_overrides
from vadlab.metrics import evaluate_all

stage_start = time.perf_counter()
settings = dict(anomalib)  # the params block (named after the library; not the package)
out_dir = Path(results_root) / data["name"] / "anomalib"
out_dir.mkdir(parents=True, exist_ok=True)
unknown = [m for m in settings["methods"] if m not in peers.PEER_METHODS]
if unknown:
    raise ValueError(f"anomalib.methods has {unknown}: anomalib has counterparts only of {list(peers.PEER_METHODS)}")
# `categories`: one list for every method, or a list per method (CFLOW trains, so it costs the most)
chosen = settings["categories"]
per_method = {m: list(chosen[m] if isinstance(chosen, dict) else chosen) for m in settings["methods"]}
categories = list(dict.fromkeys(c for m in settings["methods"] for c in per_method[m]))
absent = [c for c in categories if c not in data["categories"]]
if absent:
    raise ValueError(f"anomalib.categories has {absent}, which are not categories of data {data['name']!r} "
                     f"({data['categories']})")
available = peers.anomalib_available()
print(f"anomalib available: {available}; categories per method {per_method}, "
      f"{settings['image_size']} px, seed {seed}, torch threads {torch.get_num_threads()}")

# %%
if not available:
    status = f"skipped: anomalib not installed ({peers.INSTALL_HINT})"
    pd.DataFrame({"status": [status]}).to_csv(out_dir / "comparison.csv", index=False)
    (out_dir / "comparison.json").write_text(json.dumps({"status": status, "install": peers.INSTALL_HINT}, indent=2)
                                             + "\n")
    print(status)

# %% [markdown]
# Each (method, category): one warm-up of both libraries on 8 images (so one-off start-up costs are
# charged to neither), then vadlab's run, then anomalib's.

# %%
records, native, used = [], {}, {}
if available:
    import anomalib as anomalib_package

    size, batch = int(settings["image_size"]), int(settings.get("batch_size", 16))
    for category in categories:
        split = peers.load_category(data["root"], category, size)
        for method in [m for m in settings["methods"] if category in per_method[m]]:
            run_settings = methods[method]
            overrides = {**preset_overrides(method, run_settings.get("preset", "paper")),
                         **(run_settings.get("set") or {})}
            peers.warm_up(method, split["train"], split["test"], overrides, size)
            ours, model = peers.run_vadlab(method, split["train"], split["test"], overrides, batch, int(seed))
            peer = peers.peer_settings(method, model.config, size)
            theirs = peers.run_anomalib(method, split["train"], split["test"], peer,
                                        channel_index=getattr(model, "channel_index", None), batch_size=batch,
                                        seed=int(seed))
            for result in (ours, theirs):
                records.append({"method": method, "category": category, "library": result.library,
                                **peers.result_metrics(result, split["labels"], split["masks"])})
            plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
            used[method] = {"vadlab_overrides": plain, "anomalib": theirs.settings}
            if "native_scores" in theirs.extra:  # anomalib's own CFLOW forward: test set as one batch
                m = evaluate_all(split["labels"], theirs.extra["native_scores"], split["masks"],
                                 theirs.extra["native_maps"])
                native[f"{method}/{category}"] = {
                    **{k: round(float(m[k]), 6) for k in peers.ACCURACY_KEYS},
                    "infer_ms_per_image": round(1000 * theirs.extra["native_seconds_per_image"], 3)}
            print(f"{method:10s} {category:8s} " + "  ".join(
                f"{r['library']}: img {r['image_auroc']:.3f} pix {r['pixel_auroc']:.3f} pro {r['aupro']:.3f} "
                f"fit {r['fit_seconds']:.1f}s infer {r['infer_ms_per_image']:.1f}ms mem {r['peak_memory_mb']:.0f}MB"
                for r in records[-2:]), flush=True)
            del model, ours, theirs
            peers.release_memory()

# %%
if available:
    table = peers.comparison_table(records)
    table.to_csv(out_dir / "comparison.csv", index=False, float_format="%.6g")
    wall = time.perf_counter() - stage_start
    summary = {row["method"]: {k: round(float(row[k]), 6) for k in table.columns if k.endswith(("_diff", "_ratio"))}
               for _, row in table[table["category"] == "mean"].iterrows()}
    report = {
        "status": "ok",
        "anomalib_version": anomalib_package.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "image_size": size, "seed": int(seed), "batch_size": batch,
        "methods": list(settings["methods"]), "categories": per_method,
        "conventions": "<accuracy>_diff = vadlab - anomalib; <cost>_ratio = anomalib / vadlab "
                       "(above 1: vadlab faster or smaller); peak memory = resident memory added during fit + predict",
        "summary": summary,
        "settings": used,
        "differences": {m: peers.DIFFERENCES[m] for m in settings["methods"]},
        "anomalib_native_cflow": native,
        "stage_seconds": round(wall, 1),
        "rows": json.loads(table.to_json(orient="records")),
    }
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"stage wall time {wall:.0f} s")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        display(table.set_index(["method", "category"]).round(3).T)

# %%
assert (out_dir / "comparison.csv").is_file() and (out_dir / "comparison.json").is_file()

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
# # Stage `digits`: the one-class digits protocol
#
# The MNIST protocol of DMAD and many reconstruction papers, on scikit-learn's 8x8 digits (offline):
# for each digit, fit on the training images of that digit only and compute the image AUROC of every
# other test digit against it (`vadlab.evaluate_digits.run_digits`). `dvc repro` runs this notebook once
# per run under `digits.runs` in `params.yaml` (`-p run R`) and writes `results/digits/<R>.json` with the
# AUROC per digit and the mean. The digits are independent, so `jobs` of them run at once in worker
# processes (each seeds itself).

# %% tags=["parameters"]
run = "dmad"
seed = 0
jobs = 1
executor = "local"  # or ray: every run a task on a Ray cluster (params.yaml `executor`, `ray_address`)
ray_address = None
digits = {"image_size": 32, "digits": list(range(10)), "runs": {"dmad": {"method": "dmad", "preset": "digits"}}}
results_root = "results"

# %%
import sys
import time
from pathlib import Path

import pandas as pd

from vadlab.evaluate import run_parallel, write_json
from vadlab.evaluate_digits import run_digits
from vadlab.methods import get_method, preset_overrides


def digits_overrides(name: str, preset: str | None) -> dict:
    """``preset: digits`` = the method module's DIGITS_PRESET; otherwise as for the image datasets."""
    if preset != "digits":
        return preset_overrides(name, preset)
    module = sys.modules[get_method(name).__module__]
    if not hasattr(module, "DIGITS_PRESET"):
        raise ValueError(f"method {name!r} defines no DIGITS_PRESET; use preset paper or cpu in digits.runs")
    return dict(module.DIGITS_PRESET)


settings = digits["runs"][run]
implementation = settings.get("method", run)
overrides = {**digits_overrides(implementation, settings.get("preset", "paper")), **(settings.get("set") or {})}
print(f"digits run {run} ({implementation}) at {digits['image_size']} px, {jobs} jobs, overrides {overrides}")

# %%
start = time.perf_counter()
calls = [dict(method_name=implementation, digits=[int(d)], image_size=int(digits["image_size"]),
              overrides=overrides, seed=int(seed)) for d in digits["digits"]]
done = run_parallel(run_digits, calls, jobs, executor, ray_address)
per_digit = {int(d): r[int(d)] for d, r in zip(digits["digits"], done)}
wall = time.perf_counter() - start
result = {"run": run, "method": implementation, "image_size": int(digits["image_size"]), "overrides": overrides,
          "image_auroc": {str(d): round(a, 6) for d, a in per_digit.items()},
          "mean": round(sum(per_digit.values()) / len(per_digit), 6)}
out = Path(results_root) / "digits"
out.mkdir(parents=True, exist_ok=True)
write_json(out / f"{run}.json", result)  # a DVC metric: quality only, the wall time is printed below
print(f"{len(per_digit)} digits in {wall:.0f} s")
pd.Series(per_digit, name="image AUROC").to_frame().T

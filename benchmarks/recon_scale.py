"""What image size costs the networks trained from scratch: seconds per training epoch at 64 and 128 px.

For every trained run of ``params.yaml`` (its CPU preset and ``set:`` overrides, as the pipeline builds it),
fits of 1 and 3 epochs over 200 generated training images (batches of 16, as the pipeline loads them) are
timed at the run's image size and at 128 px (one thread, the same process, after a warm-up fit); their
difference gives the seconds per epoch, the rest the fixed cost of a fit (e.g. normalisation passes), and
the fit part of the pipeline's ``evaluate@<run>`` stage is projected as (fixed + epochs x per epoch) x
(categories x seeds) fits / ``jobs`` workers (prediction and metrics come on top).
No test image is loaded; nothing here chooses a setting.

Run::

    OMP_NUM_THREADS=1 python benchmarks/recon_scale.py --out benchmarks/results/recon_scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods import get_method, run_settings

RUNS = ("ae_ssim", "riad", "favae", "mkd", "dmad", "dmad_plus", "dmad_ppdm")


def fit_seconds(name: str, overrides: dict, size: int, train: MVTecDataset, epochs: int) -> float:
    """Seconds of one ``fit`` with ``epochs`` epochs at ``size`` px, one thread."""
    model = get_method(name)(**{**overrides, "image_size": size, "epochs": epochs})
    start = time.perf_counter()
    model.fit(make_loader(train, batch_size=16, shuffle=True, seed=0))  # the pipeline's loader
    return time.perf_counter() - start


def epoch_cost(name: str, overrides: dict, size: int, train: MVTecDataset) -> tuple[float, float]:
    """(seconds per epoch, fixed seconds per fit) from fits of 1 and 3 epochs, after a warm-up fit."""
    fit_seconds(name, overrides, size, train, 1)  # warms up allocators and kernels
    one, three = (fit_seconds(name, overrides, size, train, e) for e in (1, 3))
    per_epoch = (three - one) / 2
    return per_epoch, max(one - per_epoch, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/recon_scale")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = yaml.safe_load(Path("params.yaml").read_text())
    fits = len(params["data"]["categories"]) * int(params["n_seeds"])
    jobs = int(params.get("jobs", 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=1, categories=["brick"], n_train=200, n_test=4, size=256)
        for run in args.runs:
            name, overrides, size = run_settings(run, params["methods"])
            size = int(overrides.get("image_size", size))
            epochs = int(overrides.get("epochs", get_method(name).Config().epochs))
            row = {"run": run, "preset_size": size, "preset_epochs": epochs}
            for px in sorted({size, 128}):
                per_epoch, fixed = epoch_cost(name, overrides, px, MVTecDataset(root, "brick", "train", px))
                row[f"epoch_s_{px}"] = round(per_epoch, 2)
                row[f"fixed_s_{px}"] = round(fixed, 2)
                row[f"stage_s_{px}"] = round((fixed + per_epoch * epochs) * fits / jobs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": 1, "fits_per_stage": fits, "jobs": jobs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# 200 training images, 1 thread; stage = (fixed + preset epochs x s/epoch) x {fits} fits / {jobs} "
             f"jobs (fit only); load average {meta['load_average'][0]:.2f}",
             f"{'run':<11}{'size':>5}{'epochs':>7}{'s/epoch 64':>11}{'s/epoch 128':>12}{'stage 64':>9}{'stage 128':>10}"]
    for r in rows:
        lines.append(f"{r['run']:<11}{r['preset_size']:>5}{r['preset_epochs']:>7}{r.get('epoch_s_64', '-'):>11}"
                     f"{r.get('epoch_s_128', '-'):>12}{r.get('stage_s_64', '-'):>9}{r.get('stage_s_128', '-'):>10}")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

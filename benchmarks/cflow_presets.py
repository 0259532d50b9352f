"""CFLOW-AD CPU presets chosen by the held-out NLL of normal training images, never by test labels.

Two phases, run one after the other (one thread; the second reads the first's JSON):

``select``  Every candidate preset is fitted per category with ``val_fraction = 0.2`` (the same seeded
            20 % of the normal *training* images held out for every candidate) and scored by its best
            held-out per-dimension NLL (lower is better).  No test image is loaded.  The fitted models
            are saved (``--models``) so that ``test`` scores the chosen one without refitting it.
            The chosen candidate: the lowest mean held-out NLL over the categories among those whose
            projected pipeline cost stays within ``--budget-s`` (12 fits, 2 at a time).
``test``    Only now test images and labels: image AUROC per category of the chosen candidate (its
            saved model), of the current CPU preset as the pipeline runs it (``val_fraction = 0``,
            all training images, refitted here) and of PaDiM (the pipeline's settings at 128 px).

Run::

    OMP_NUM_THREADS=1 python benchmarks/cflow_presets.py select --data DIR --out benchmarks/results/cflow_presets
    OMP_NUM_THREADS=1 python benchmarks/cflow_presets.py test --data DIR --out benchmarks/results/cflow_presets

(``DIR``: ``vadlab.data.generate(DIR, seed=0, n_train=200, n_test=80, size=256)``, or an ELPV folder from
``vadlab data elpv --out DIR --max-train 200`` with ``--categories mono poly``.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from vadlab import peers
from vadlab.data import MVTecDataset
from vadlab.evaluate import build_method, seed_everything
from vadlab.methods.cflow import CPU_PRESET
from vadlab.metrics import image_auroc

#: the current preset (pipeline default before this study) and candidate changes of it
OLD_PRESET = {"layers": ("blocks.1", "blocks.2", "blocks.4"), "coupling_blocks": 4, "condition_channels": 64,
              "meta_epochs": 3, "sub_epochs": 2, "warmup_epochs": 1, "lr": 1e-3}
HELD_OUT = {"val_fraction": 0.2}
CANDIDATES: dict[str, dict] = {
    "current (4 blocks, 3x2 epochs)": {},
    "longer (7x2 epochs, patience 4)": {"meta_epochs": 7, "patience": 4},
    "8 couplings": {"coupling_blocks": 8},
    "lr 2e-4": {"lr": 2e-4},
    "P = 128": {"condition_channels": 128},
}
#: the CFLOW stage of `dvc repro` on the generated data with the old preset (6 categories x 2 seeds, 2 jobs)
STAGE_S = 200.0


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def fit(train: torch.Tensor, overrides: dict) -> tuple[torch.nn.Module, float]:
    seed_everything(0)
    start = time.perf_counter()
    model = build_method("cflow", overrides, seed=0)
    model.fit(list(train.split(32)))
    return model, time.perf_counter() - start


def select(args: argparse.Namespace) -> None:
    out = {"phase": "select", "data": str(args.data), "uptime_start": uptime(), "torch_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "candidates": {}}
    for i, (name, change) in enumerate(CANDIDATES.items()):
        if args.candidates and name not in args.candidates:
            continue
        cfg = {**OLD_PRESET, **change, **HELD_OUT}
        rows = {}
        for category in args.categories:
            train = torch.stack([item["image"] for item in MVTecDataset(args.data, category, "train", args.size)])
            model, fit_s = fit(train, cfg)  # no test image is loaded in this phase
            val = [h["val_nll"] for h in model.history]
            rows[category] = {"val_nll": min(val), "best_epoch": model.best_epoch, "epochs_run": len(val),
                              "fit_s": fit_s, "uptime": uptime(), "history": model.history}
            path = Path(args.models) / f"candidate{i}_{category}.pt"
            model.save(path)
            rows[category]["model"] = str(path)
            print(f"{name:<34}{category:<8} held-out NLL {min(val):.4f} (best sub-epoch {model.best_epoch} of "
                  f"{len(val)})  fit {fit_s:.1f} s  [{rows[category]['uptime']}]", flush=True)
        out["candidates"][name] = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                                   "per_category": rows}
        Path(args.out + "_select.json").write_text(json.dumps(out, indent=1))
    base = out["candidates"][next(iter(out["candidates"]))]  # the current preset (listed first)
    base_s = sum(r["fit_s"] for r in base["per_category"].values())
    lines = [f"CFLOW preset selection by held-out normal NLL ({args.data}, {args.size}px, val_fraction 0.2, seed 0, "
             f"1 thread; {out['uptime_start']})",
             f"{'candidate':<34}{'held-out NLL':>13}{'fit s (sum)':>12}{'proj. stage s':>14}  per category NLL"]
    best = None
    for name, c in out["candidates"].items():
        nll = sum(r["val_nll"] for r in c["per_category"].values()) / len(c["per_category"])
        fit_s = sum(r["fit_s"] for r in c["per_category"].values())
        projected = STAGE_S * fit_s / base_s  # the old preset's stage cost scaled by the fit time
        c.update(mean_val_nll=nll, fit_s=fit_s, projected_stage_s=projected)
        if projected <= args.budget_s and (best is None or nll < out["candidates"][best]["mean_val_nll"]):
            best = name
        lines.append(f"{name:<34}{nll:>13.4f}{fit_s:>12.1f}{projected:>14.0f}  " +
                     " ".join(f"{k} {r['val_nll']:.3f}" for k, r in c["per_category"].items()))
    out["chosen"] = best
    lines.append(f"chosen (lowest mean held-out NLL within {args.budget_s:.0f} s projected): {best}")
    Path(args.out + "_select.json").write_text(json.dumps(out, indent=1))
    Path(args.out + "_select.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def test(args: argparse.Namespace) -> None:
    sel = json.loads(Path(args.out + "_select.json").read_text())
    chosen = sel["candidates"][sel["chosen"]]
    padim = {"n_features": 100, "ridge": 0.01, "sigma": 4.0}  # params.yaml methods.padim
    rows = {}
    for category in args.categories:
        split = peers.load_category(args.data, category, args.size)
        from vadlab.methods.base import AnomalyMethod

        model = AnomalyMethod.load(chosen["per_category"][category]["model"])
        chosen_auc = image_auroc(split["labels"], model.predict(split["test"])[0].numpy())
        old, old_s = fit(split["train"], OLD_PRESET)
        old_auc = image_auroc(split["labels"], old.predict(split["test"])[0].numpy())
        seed_everything(0)
        start = time.perf_counter()
        pm = build_method("padim", padim, seed=0).fit(list(split["train"].split(32)))
        padim_s = time.perf_counter() - start
        padim_auc = image_auroc(split["labels"], pm.predict(split["test"])[0].numpy())
        rows[category] = {"chosen_auroc": chosen_auc, "chosen_fit_s": chosen["per_category"][category]["fit_s"],
                          "current_auroc": old_auc, "current_fit_s": old_s, "padim_auroc": padim_auc,
                          "padim_fit_s": padim_s, "uptime": uptime()}
        print(category, rows[category], flush=True)
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values())) if k != "uptime"}
    lines = [f"Test image AUROC, one seed ({args.data}, {args.size}px, 1 thread); chosen by held-out NLL: "
             f"{sel['chosen']}",
             f"{'category':<10}{'current':>9}{'fit s':>7}{'chosen':>9}{'fit s':>7}{'PaDiM':>8}{'fit s':>7}  uptime"]
    for c, r in [*rows.items(), ("mean", mean)]:
        lines.append(f"{c:<10}{r['current_auroc']:>9.3f}{r['current_fit_s']:>7.1f}{r['chosen_auroc']:>9.3f}"
                     f"{r['chosen_fit_s']:>7.1f}{r['padim_auroc']:>8.3f}{r['padim_fit_s']:>7.1f}  {r.get('uptime', '')}")
    projected = STAGE_S * mean["chosen_fit_s"] / mean["current_fit_s"]
    lines.append(f"projected CFLOW stage of dvc repro (old preset: {STAGE_S:.0f} s): {projected:.0f} s "
                 f"(x {mean['chosen_fit_s'] / mean['current_fit_s']:.2f}, chosen fit incl. held-out evaluations)")
    Path(args.out + "_test.json").write_text(json.dumps({"chosen": sel["chosen"], "per_category": rows,
                                                         "mean": mean}, indent=1))
    Path(args.out + "_test.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["select", "test"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel", "screw", "washer", "chip"])
    parser.add_argument("--candidates", nargs="+", help="names of CANDIDATES to fit (default: all)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/cflow_presets")
    parser.add_argument("--models", default=os.environ.get("TMPDIR", "/tmp") + "/cflow_presets_models")
    parser.add_argument("--budget-s", type=float, default=500.0, help="max projected CFLOW stage seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    Path(args.models).mkdir(parents=True, exist_ok=True)
    select(args) if args.phase == "select" else test(args)


if __name__ == "__main__":
    main()

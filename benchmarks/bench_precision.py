"""The frozen backbone in float32 or bfloat16: speed, and what it changes in the feature methods' accuracy.

For each method (PaDiM, semi-orthogonal embedding, PatchCore, CFLOW) and each category of the generated
data, the method is fitted and evaluated twice in the same process, once with ``backbone_precision``
float32 and once bfloat16 (everything else equal: preset, image size, seed); the image and pixel AUROC
of both and their difference are reported, with the backbone's forward time per image in each precision
(the median of three passes over the test images, after a warm-up).  The feature cache is off.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_precision.py [--size 128] [--preset cpu]
[--methods padim semi_orthogonal patchcore cflow] [--out benchmarks/results/precision]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vadlab.backbones import FeatureExtractor
from vadlab.data import SYNTH_CATEGORIES, MVTecDataset, generate, make_loader
from vadlab.evaluate import build_method, evaluate
from vadlab.methods import preset_overrides

PRECISIONS = ("float32", "bfloat16")


def backbone_ms_per_image(images: torch.Tensor, precision: str, batch: int = 16) -> float:
    fx = FeatureExtractor("efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), precision=precision)
    with torch.no_grad():
        fx(images[:batch])
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for chunk in images.split(batch):
                fx(chunk)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="the methods' image size (the pipeline's: 128)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["padim", "semi_orthogonal", "patchcore", "cflow"])
    parser.add_argument("--categories", nargs="+", default=list(SYNTH_CATEGORIES))
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args()

    root = generate(tempfile.mkdtemp(prefix="vadlab-precision-"), seed=0, categories=args.categories,
                    n_train=args.n_train, n_test=args.n_test, size=256)
    load = os.getloadavg()[0]
    runs = []
    for category in args.categories:
        train = MVTecDataset(root, category, "train", args.size)
        test = MVTecDataset(root, category, "test", args.size)
        for method in args.methods:
            row = {"method": method, "category": category}
            for precision in PRECISIONS:
                overrides = {**preset_overrides(method, args.preset), "backbone_precision": precision}
                model = build_method(method, overrides, seed=0)
                result = evaluate(model, make_loader(train, batch_size=16, shuffle=True, seed=0), test)
                row[precision] = {k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "fit_seconds")}
            row["image_auroc_points"] = 100 * (row["bfloat16"]["image_auroc"] - row["float32"]["image_auroc"])
            row["pixel_auroc_points"] = 100 * (row["bfloat16"]["pixel_auroc"] - row["float32"]["pixel_auroc"])
            runs.append(row)
            print(f"{method:16s} {category:7s} image AUROC {row['float32']['image_auroc']:.4f} -> "
                  f"{row['bfloat16']['image_auroc']:.4f} ({row['image_auroc_points']:+.2f} points)", flush=True)
    full = MVTecDataset(root, args.categories[0], "test", 256)
    images = torch.stack([full[i]["image"] for i in range(min(32, len(full)))])
    speed = {p: backbone_ms_per_image(images, p) for p in PRECISIONS}
    summary = {}
    for method in args.methods:
        rows = [r for r in runs if r["method"] == method]
        summary[method] = {key: statistics.mean(r[key] for r in rows)
                           for key in ("image_auroc_points", "pixel_auroc_points")}
        summary[method].update({f"{p}_image_auroc": statistics.mean(r[p]["image_auroc"] for r in rows)
                                for p in PRECISIONS})
    report = {"command": "python benchmarks/bench_precision.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if v is not None and k != "out"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, load average at start {load:.2f}",
              "backbone_ms_per_image_256px": speed, "summary": summary, "runs": runs}
    lines = [f"bench_precision: {report['machine']}",
             f"backbone forward at 256 px, ms/image: float32 {speed['float32']:.1f}, bfloat16 "
             f"{speed['bfloat16']:.1f} ({speed['float32'] / speed['bfloat16']:.2f}x)",
             f"{'method':16s} {'float32':>8s} {'bfloat16':>9s} {'image pts':>10s} {'pixel pts':>10s}  "
             f"(mean over {len(args.categories)} categories, image AUROC)"]
    for method, s in summary.items():
        lines.append(f"{method:16s} {s['float32_image_auroc']:8.4f} {s['bfloat16_image_auroc']:9.4f} "
                     f"{s['image_auroc_points']:+10.2f} {s['pixel_auroc_points']:+10.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from vadlab.fileio import write_json, write_text

        write_json(Path(f"{args.out}.json"), report)
        write_text(Path(f"{args.out}.txt"), text + "\n")


if __name__ == "__main__":
    main()

"""Fit and inference of the feature methods against their floor: the backbone's forward pass alone.

For each method: fit time per training image and ``predict`` time per test image, beside the time of the
method's own frozen backbone (``model.backbone``, its layers, its input size) on the same images, in the
same process, in batches of 16 as the pipeline's evaluation feeds them, after a warm-up. The ratio method / backbone says what
everything beyond the backbone costs (embedding, statistics or memory-bank search, upsampling, blur, score);
1.00 is the floor. The feature cache is off. Each time is the median of ``--repeats`` runs.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_floor.py [--size 256] [--device cpu|cuda] [--precision float32|bfloat16]
[--methods padim semi_orthogonal patchcore cflow] [--out benchmarks/results/floor]`` (writes .json and .txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vadlab.backbones import use_feature_cache
from vadlab.data import MVTecDataset, generate
from vadlab.evaluate import build_method
from vadlab.methods import preset_overrides


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(method: str, train: torch.Tensor, test: torch.Tensor, device: str, repeats: int,
            preset: str, batch: int = 16, precision: str = "float32") -> dict:
    overrides = {**preset_overrides(method, preset), "device": device, "backbone_precision": precision}
    model = build_method(method, overrides, seed=0)
    batches = [train[i:i + batch].to(device) for i in range(0, len(train), batch)]
    test = test.to(device)
    model.fit(batches[:1])  # warm-up: allocations, kernels
    model.predict(test[:batch])
    fit = _median_seconds(lambda: build_method(method, overrides, seed=0).fit(batches), max(1, repeats // 2))
    model = build_method(method, overrides, seed=0).fit(batches)
    predict = _median_seconds(lambda: [model.predict(chunk) for chunk in test.split(batch)], repeats)
    backbone = model.backbone
    size = getattr(model.config, "image_size", None) or test.shape[-1]

    def floor(images: torch.Tensor) -> None:
        with torch.no_grad():
            for chunk in images.split(batch):
                if chunk.shape[-1] != size:
                    chunk = torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear",
                                                            align_corners=False)
                backbone(chunk)

    floor(test[:batch])
    fit_floor = _median_seconds(lambda: floor(train.to(device)), repeats)
    predict_floor = _median_seconds(lambda: floor(test), repeats)
    return {"method": method, "preset": preset, "n_train": len(train), "n_test": len(test),
            "fit_ms_per_image": 1000 * fit / len(train), "fit_floor_ms_per_image": 1000 * fit_floor / len(train),
            "fit_ratio": fit / fit_floor,
            "predict_ms_per_image": 1000 * predict / len(test),
            "predict_floor_ms_per_image": 1000 * predict_floor / len(test), "predict_ratio": predict / predict_floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["padim", "semi_orthogonal", "patchcore", "cflow"])
    parser.add_argument("--preset", default="paper", help="paper (the defaults) or cpu; cflow always uses cpu")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="the frozen backbone's arithmetic (method and floor alike)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args()
    use_feature_cache(None)
    os.environ.pop("VADLAB_FEATURE_CACHE", None)
    root = generate(tempfile.mkdtemp(), seed=0, categories=["brick"], n_train=args.n_train, n_test=args.n_test,
                    size=args.size)
    load = lambda split: torch.stack([d["image"] for d in MVTecDataset(root, "brick", split, args.size)])  # noqa: E731
    train, test = load("train"), load("test")
    rows = [measure(m, train, test, args.device, args.repeats, "cpu" if m == "cflow" else args.preset,
                    precision=args.precision) for m in args.methods]
    context = {"size": args.size, "device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__}
    lines = [f"bench_floor: {args.size} px, {args.device}, {args.precision}, {context['threads']} threads, load average "
             f"{context['load_average'][0]:.2f}",
             f"{'method':16s} {'fit ms/img':>10s} {'floor':>7s} {'ratio':>6s}   {'predict ms/img':>14s} {'floor':>7s} "
             f"{'ratio':>6s}"]
    for r in rows:
        lines.append(f"{r['method']:16s} {r['fit_ms_per_image']:10.1f} {r['fit_floor_ms_per_image']:7.1f} "
                     f"{r['fit_ratio']:6.2f}   {r['predict_ms_per_image']:14.1f} {r['predict_floor_ms_per_image']:7.1f} "
                     f"{r['predict_ratio']:6.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from vadlab.fileio import write_json, write_text

        write_json(Path(f"{args.out}.json"), {"context": context, "rows": rows})
        write_text(Path(f"{args.out}.txt"), text + "\n")


if __name__ == "__main__":
    main()

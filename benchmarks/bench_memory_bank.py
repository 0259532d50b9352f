"""vadlab vs anomalib 2.7: PatchCore and PaDiM on the same generated data, backbone, weights and settings.

Both libraries get the same EfficientNet-Lite0 ImageNet weights (vadlab's offline copy, loaded into
anomalib's timm model), the same images already resized to ``--image-size`` and normalised the way
these weights expect (mean = std = 0.5), the same layers, the same coreset ratio and, for PaDiM, the
same number of random channels.  anomalib's torch models (``PatchcoreModel``, ``PadimModel``) are
driven directly, as its Lightning ``training_step`` / ``fit`` / ``validation_step`` do, so no trainer
overhead is counted against it.  Each (library, method) runs in a fresh process, so the peak resident
memory (``ru_maxrss``) of one run does not leak into another; it includes the interpreter, torch and
the preloaded images (the "baseline" line shows that floor).

Run (a script, not a test; takes ~10 minutes at 256 px with anomalib's 1 % coreset on 2 cores):

    OMP_NUM_THREADS=2 python benchmarks/bench_memory_bank.py --data build/synthetic --category brick \
        --seeds 0 1 2 --methods padim patchcore --json benchmarks/results/memory_bank.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

LITE0_MEAN = LITE0_STD = 0.5


def load_split(data: Path, category: str, split: str, size: int) -> dict[str, torch.Tensor]:
    """All images (and masks, labels) of one split as tensors, images in [0, 1]."""
    from vadlab.data import MVTecDataset, make_loader

    ds = MVTecDataset(data, category, split, size)
    batch = next(iter(make_loader(ds, batch_size=len(ds), shuffle=False)))
    return {"image": batch["image"], "mask": batch["mask"][:, 0], "label": batch["label"]}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ------------------------------------------------------------------------------- the two libraries


def vadlab_model(method: str, args: argparse.Namespace, seed: int):
    from vadlab.methods import get_method

    if method == "patchcore":  # seed: JL projection and first coreset centre
        return get_method("patchcore")(coreset_ratio=args.coreset_ratio, layers=("blocks.2", "blocks.4"),
                                       batch_size=args.batch_size, seed=seed)
    return get_method("padim")(n_features=args.n_features, batch_size=args.batch_size, seed=seed)  # channel subset


def _lite0_into_anomalib(extractor: torch.nn.Module) -> None:
    """Copy vadlab's EfficientNet-Lite0 ImageNet weights into anomalib's timm features-only model."""
    from vadlab.backbones import create_backbone

    source = create_backbone("efficientnet_lite0").state_dict()
    target = extractor.feature_extractor
    own = target.state_dict()
    missing = [k for k in own if k not in source]
    if missing:
        raise RuntimeError(f"anomalib's backbone has weights vadlab's lacks: {missing[:4]}")
    target.load_state_dict({k: source[k] for k in own})


def anomalib_model(method: str, args: argparse.Namespace, seed: int):
    """anomalib's torch model; its randomness (PaDiM's channel subset in __init__, PatchCore's sparse
    projection and first centre in subsample_embedding) draws from torch's and numpy's global generators,
    which :func:`run_one` seeds with ``seed``."""
    if method == "patchcore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
                               pre_trained=False, num_neighbors=9)
    else:
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(layers=["blocks.1", "blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
                           pre_trained=False, n_features=args.n_features)
    _lite0_into_anomalib(model.feature_extractor)
    return model


def run_one(library: str, method: str, args: argparse.Namespace, seed: int, queue: Any) -> None:
    """Fit and predict one (library, method, seed) in this process; put the measurements on ``queue``."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib's sparse projection samples columns with numpy's global generator
    train = load_split(args.data, args.category, "train", args.image_size)["image"]
    test = load_split(args.data, args.category, "test", args.image_size)
    if library == "baseline":  # interpreter + torch + images: the floor under every peak below
        queue.put({"peak_mb": peak_mb()})
        return
    batches = list(train.split(args.batch_size))
    if args.warm_imports:  # import both libraries' modules first, so fit time excludes Python imports
        import timm  # noqa: F401

        import vadlab.methods.padim, vadlab.methods.patchcore  # noqa: F401, E401
        from anomalib.models.image.padim.torch_model import PadimModel  # noqa: F401
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
    t0 = time.perf_counter()
    if library == "vadlab":
        model = vadlab_model(method, args, seed)
        model.fit(batches)
    else:
        model = anomalib_model(method, args, seed)
        model.train()
        with torch.no_grad():
            for b in batches:  # training_step: features into the memory bank
                model((b - LITE0_MEAN) / LITE0_STD)
            if method == "patchcore":
                model.subsample_embedding(args.coreset_ratio)
            else:
                model.fit()
    fit_s = time.perf_counter() - t0

    scores, maps = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        if library == "vadlab":
            s, m = model.predict(test["image"])
            scores, maps = [s], [m]
        else:
            model.eval()
            for b in test["image"].split(args.batch_size):
                out = model((b - LITE0_MEAN) / LITE0_STD)
                scores.append(out.pred_score.reshape(-1))
                maps.append(out.anomaly_map.reshape(len(b), *b.shape[-2:]))
    predict_s = time.perf_counter() - t0

    from vadlab.metrics import image_auroc, pixel_auroc

    scores, maps = torch.cat(scores).float().numpy(), torch.cat(maps).float().numpy()
    queue.put({
        "fit_s": fit_s,
        "infer_ms": 1000 * predict_s / len(test["image"]),
        "peak_mb": peak_mb(),
        "image_auroc": image_auroc(test["label"].numpy(), scores),
        "pixel_auroc": pixel_auroc(test["mask"].numpy(), maps),
    })


def measure(library: str, method: str, args: argparse.Namespace, seed: int = 0) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(library, method, args, seed, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


KEYS = ("fit_s", "infer_ms", "peak_mb", "image_auroc", "pixel_auroc")


def row(method: str, lib: str, label: str, r: dict[str, float], std: dict[str, float] | None = None) -> str:
    """One table row; with ``std``, mean +- std over seeds."""
    def cell(k: str, width: int, fmt: str) -> str:
        text = format(r[k], fmt) if std is None else f"{format(r[k], fmt)}+-{format(std[k], fmt)}"
        return f"{text:>{width}s}"
    return (f"{method:10s} {lib:9s} {label:5s} {cell('fit_s', 13, '.1f')} {cell('infer_ms', 13, '.1f')} "
            f"{cell('peak_mb', 11, '.0f')} {cell('image_auroc', 15, '.4f')} {cell('pixel_auroc', 15, '.4f')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/vadlab_bench"))
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one fit per seed and library")
    parser.add_argument("--warm-imports", action="store_true",
                        help="import timm, vadlab's and anomalib's model modules before the fit timer starts")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here (after every run)")
    args = parser.parse_args()

    import json
    import platform
    import statistics
    import sys

    from vadlab.data import generate

    if not (args.data / args.category / "train").is_dir():
        generate(args.data, seed=0, categories=[args.category], n_train=args.n_train, n_test=args.n_test,
                 size=args.image_size)
    setting = (f"data {args.data}/{args.category}, {args.image_size} px, threads {torch.get_num_threads()} "
               f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), backbone EfficientNet-Lite0 (same weights), "
               f"coreset ratio {args.coreset_ratio}, PaDiM d={args.n_features}, seeds {args.seeds}")
    print(setting, flush=True)
    base = measure("baseline", "", args)["peak_mb"]
    print(f"baseline peak memory (python + torch + images): {base:.0f} MB", flush=True)
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "setting": setting,
                           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}",
                           "baseline_peak_mb": base, "runs": {}}
    header = f"{'method':10s} {'library':9s} {'seed':5s} {'fit s':>13s} {'infer ms/img':>13s} {'peak MB':>11s} " \
             f"{'image AUROC':>15s} {'pixel AUROC':>15s}"
    for method in args.methods:
        print(header, flush=True)
        means = {}
        for lib in ("vadlab", "anomalib"):
            runs = []
            for seed in args.seeds:
                r = measure(lib, method, args, seed)
                runs.append(r)
                out["runs"].setdefault(method, {}).setdefault(lib, []).append({"seed": seed, **r})
                print(row(method, lib, str(seed), r), flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(out, indent=1))
            mean = {k: statistics.mean(r[k] for r in runs) for k in KEYS}
            std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in KEYS}
            means[lib] = mean
            out.setdefault("summary", {}).setdefault(method, {})[lib] = {"mean": mean, "std": std}
            print(row(method, lib, "mean", mean, std), flush=True)
        v, a = means["vadlab"], means["anomalib"]
        ratios = {"fit": a["fit_s"] / v["fit_s"], "inference": a["infer_ms"] / v["infer_ms"],
                  "peak_memory_above_baseline": (a["peak_mb"] - base) / max(v["peak_mb"] - base, 1),
                  "image_auroc_points": 100 * (v["image_auroc"] - a["image_auroc"]),
                  "pixel_auroc_points": 100 * (v["pixel_auroc"] - a["pixel_auroc"])}
        out["summary"][method]["anomalib_over_vadlab"] = ratios
        print(f"{method:10s} means, anomalib/vadlab: fit {ratios['fit']:.1f}x, inference {ratios['inference']:.1f}x, "
              f"peak memory above baseline {ratios['peak_memory_above_baseline']:.1f}x; AUROC difference "
              f"(vadlab - anomalib): image {ratios['image_auroc_points']:+.1f} points, "
              f"pixel {ratios['pixel_auroc_points']:+.1f} points\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

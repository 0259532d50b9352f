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

    OMP_NUM_THREADS=2 python benchmarks/bench_memory_bank.py --data /tmp/vadlab_bench --category brick
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


def vadlab_model(method: str, args: argparse.Namespace):
    from vadlab.methods import get_method

    if method == "patchcore":
        return get_method("patchcore")(coreset_ratio=args.coreset_ratio, layers=("blocks.2", "blocks.4"),
                                       batch_size=args.batch_size)
    return get_method("padim")(n_features=args.n_features, batch_size=args.batch_size)


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


def anomalib_model(method: str, args: argparse.Namespace):
    if method == "patchcore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
                               pre_trained=False, num_neighbors=9)
    else:
        from anomalib.models.image.padim.torch_model import PadimModel

        torch.manual_seed(1024)
        model = PadimModel(layers=["blocks.1", "blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0",
                           pre_trained=False, n_features=args.n_features)
    _lite0_into_anomalib(model.feature_extractor)
    return model


def run_one(library: str, method: str, args: argparse.Namespace, queue: Any) -> None:
    """Fit and predict one (library, method) pair in this process; put the measurements on ``queue``."""
    torch.manual_seed(0)
    train = load_split(args.data, args.category, "train", args.image_size)["image"]
    test = load_split(args.data, args.category, "test", args.image_size)
    if library == "baseline":  # interpreter + torch + images: the floor under every peak below
        queue.put({"peak_mb": peak_mb()})
        return
    batches = list(train.split(args.batch_size))
    t0 = time.perf_counter()
    if library == "vadlab":
        model = vadlab_model(method, args)
        model.fit(batches)
    else:
        model = anomalib_model(method, args)
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


def measure(library: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(library, method, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
    args = parser.parse_args()

    from vadlab.data import generate

    if not (args.data / args.category / "train").is_dir():
        generate(args.data, seed=0, categories=[args.category], n_train=args.n_train, n_test=args.n_test,
                 size=args.image_size)
    print(f"data {args.data}/{args.category}, {args.image_size} px, threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), backbone EfficientNet-Lite0 (same weights), "
          f"coreset ratio {args.coreset_ratio}, PaDiM d={args.n_features}", flush=True)
    base = measure("baseline", "", args)["peak_mb"]
    print(f"baseline peak memory (python + torch + images): {base:.0f} MB", flush=True)
    header = f"{'method':10s} {'library':9s} {'fit s':>8s} {'infer ms/img':>13s} {'peak MB':>8s} " \
             f"{'image AUROC':>12s} {'pixel AUROC':>12s}"
    for method in args.methods:
        rows = {lib: measure(lib, method, args) for lib in ("vadlab", "anomalib")}
        print(header)
        for lib, r in rows.items():
            print(f"{method:10s} {lib:9s} {r['fit_s']:8.1f} {r['infer_ms']:13.1f} {r['peak_mb']:8.0f} "
                  f"{r['image_auroc']:12.4f} {r['pixel_auroc']:12.4f}", flush=True)
        v, a = rows["vadlab"], rows["anomalib"]
        print(f"{method:10s} anomalib/vadlab: fit {a['fit_s'] / v['fit_s']:.1f}x, inference "
              f"{a['infer_ms'] / v['infer_ms']:.1f}x, peak memory above baseline "
              f"{(a['peak_mb'] - base) / max(v['peak_mb'] - base, 1):.1f}x; AUROC difference (vadlab - anomalib): "
              f"image {100 * (v['image_auroc'] - a['image_auroc']):+.1f} points, "
              f"pixel {100 * (v['pixel_auroc'] - a['pixel_auroc']):+.1f} points\n", flush=True)


if __name__ == "__main__":
    main()

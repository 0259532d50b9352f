"""CFLOW-AD speed: vadlab's CFlow next to anomalib's Cflow, same data, backbone and flow size, one run.

Both use EfficientNet-Lite0 (the offline ImageNet weights of ``vadlab.backbones``, copied into
anomalib's encoder, no hub), the same layers, coupling blocks, condition width and fiber batch.
anomalib is driven by :func:`vadlab.peers.anomalib_cflow` (its own ``Cflow.training_step`` and
decoders, no Lightning Trainer; the pipeline stage ``anomalib`` uses the same code).  Reported:

- training throughput: feature vectors (fibers) per second over one pass over all training fibers of
  every scale (anomalib recomputes the encoder in its step, vadlab caches features: both counted; fit
  time includes both libraries' pass over the training fibers for the score normalisation);
- inference time per image (batch 16, after a warm-up of both), and the image AUROC of the one epoch.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_cflow.py [--data DIR] [--category brick] [--size 128]
[--meta-epochs 1 --sub-epochs 1]``
(needs ``pip install anomalib==2.7.0``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from vadlab import peers
from vadlab.data import generate
from vadlab.methods.cflow import CPU_PRESET
from vadlab.metrics import image_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="generated dataset root (default: generate into a temp dir)")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--meta-epochs", type=int, default=1, help="3 with --sub-epochs 2: the CPU preset's 6 epochs")
    parser.add_argument("--sub-epochs", type=int, default=1)
    args = parser.parse_args()
    anomalib = peers.require_anomalib()
    root = args.data or generate(tempfile.mkdtemp(), seed=0, categories=[args.category], n_train=args.n_train,
                                 n_test=80, size=args.size)
    split = peers.load_category(root, args.category, args.size)
    # meta x sub passes over all fibers (default one epoch) for both, the CPU preset's flow size
    cfg = {**CPU_PRESET, "meta_epochs": args.meta_epochs, "sub_epochs": args.sub_epochs, "warmup_epochs": 0,
           "fiber_batch": 256,
           "val_fraction": 0.0}  # every training image fitted, as anomalib does
    peers.warm_up("cflow", split["train"], split["test"], cfg, args.size)
    ours, model = peers.run_vadlab("cflow", split["train"], split["test"], cfg, batch_size=16, seed=0)
    settings = peers.peer_settings("cflow", model.config, args.size)
    theirs = peers.run_anomalib("cflow", split["train"], split["test"], settings, batch_size=16, seed=0)
    with torch.no_grad():
        per_image = sum(f.shape[-2] * f.shape[-1] for f in model.backbone(split["test"][:1]))
    n_fibers = per_image * len(split["train"])
    print(f"CFLOW-AD speed, {args.category} {args.size}px, {len(split['train'])} train / {len(split['test'])} test "
          f"images, EfficientNet-Lite0 {list(cfg['layers'])}, {cfg['coupling_blocks']} blocks, "
          f"P={cfg['condition_channels']}, fiber batch 256, {cfg['meta_epochs'] * cfg['sub_epochs']} epoch(s); torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'implementation':<22}{'train fibers/s':>16}{'fit s':>9}{'infer ms/img':>14}{'image AUROC':>13}")
    for name, r in (("vadlab CFlow", ours), (f"anomalib {anomalib.__version__} Cflow", theirs)):
        print(f"{name:<22}{n_fibers / r.fit_seconds:>16.0f}{r.fit_seconds:>9.1f}"
              f"{r.predict_seconds_per_image * 1000:>14.1f}{image_auroc(split['labels'], r.scores):>13.3f}")


if __name__ == "__main__":
    main()

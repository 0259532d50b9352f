"""CFLOW-AD speed: vadlab's CFlow next to anomalib's Cflow, same data, backbone and flow size, one run.

Both use EfficientNet-Lite0 (the offline ImageNet weights of ``vadlab.backbones``, copied into
anomalib's encoder, no hub), the same layers, coupling blocks, condition width and fiber batch.
anomalib's own ``Cflow.training_step`` and ``CflowModel.forward`` are called directly (no Lightning
Trainer); both models see identically normalised inputs.  Reported:

- training throughput: feature vectors (fibers) per second over one pass over all training fibers of
  every scale (anomalib recomputes the encoder in its step, vadlab caches features: both counted);
- inference time per image (batch 16, after one warm-up batch), and the image AUROC of the one epoch.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_cflow.py [--data DIR] [--category brick] [--size 128]``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from types import SimpleNamespace

import torch
from sklearn.metrics import roc_auc_score

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods.cflow import CPU_PRESET, CFlow


def load_split(root, category, size):
    train = MVTecDataset(root, category, "train", size)
    test = MVTecDataset(root, category, "test", size)
    train_images = torch.stack([train[i]["image"] for i in range(len(train))])
    test_images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = [test[i]["label"] for i in range(len(test))]
    return train, train_images, test_images, labels


def time_predict(fn, images, batch=16):
    fn(images[:batch])  # warm-up
    start = time.perf_counter()
    scores = torch.cat([fn(chunk) for chunk in images.split(batch)])
    return (time.perf_counter() - start) / len(images), scores


def bench_vadlab(train, test_images, labels, cfg):
    model = CFlow(**cfg)
    loader = make_loader(train, batch_size=16, shuffle=False, seed=0)
    start = time.perf_counter()
    model.fit(loader)
    fit_s = time.perf_counter() - start
    n_fibers = sum(f.shape[-2] * f.shape[-1] for f in model.backbone(test_images[:1])) * len(train)
    per_image, scores = time_predict(lambda x: model.predict(x)[0], test_images)
    return n_fibers / fit_s, per_image, roc_auc_score(labels, scores.numpy()), fit_s


def bench_anomalib(train_images, test_images, labels, cfg, vadlab_backbone):
    from anomalib.models import Cflow

    model = Cflow(backbone="tf_efficientnet_lite0", layers=list(cfg["layers"]), pre_trained=False,
                  fiber_batch_size=cfg.get("fiber_batch", 256), condition_vector=cfg["condition_channels"],
                  coupling_blocks=cfg["coupling_blocks"], clamp_alpha=1.9, lr=cfg["lr"],
                  pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    model.model.encoder.feature_extractor.load_state_dict(vadlab_backbone.body.state_dict())
    opt = model.configure_optimizers()
    opt = opt[0] if isinstance(opt, (list, tuple)) else opt
    model.optimizers = lambda: opt  # drive anomalib's own training_step without a Lightning Trainer
    model.manual_backward = lambda loss: loss.backward()
    model.log = lambda *a, **k: None
    norm = vadlab_backbone.normalize  # same input statistics as vadlab's extractor
    model.model.decoders.train()
    torch.manual_seed(0)
    start = time.perf_counter()
    n_fibers = 0
    for chunk in train_images.split(16):
        model.training_step(SimpleNamespace(image=norm(chunk)))
        n_fibers += sum(f.shape[-2] * f.shape[-1] for f in model.model.encoder(norm(chunk[:1])).values()) * len(chunk)
    fit_s = time.perf_counter() - start
    model.model.eval()

    @torch.no_grad()
    def predict(x):
        out = model.model(norm(x))
        return out.pred_score.flatten()

    per_image, scores = time_predict(predict, test_images)
    return n_fibers / fit_s, per_image, roc_auc_score(labels, scores.numpy()), fit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="generated dataset root (default: generate into a temp dir)")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    root = args.data or generate(tempfile.mkdtemp(), seed=0, categories=[args.category], n_train=args.n_train,
                                 n_test=80, size=args.size)
    train, train_images, test_images, labels = load_split(root, args.category, args.size)
    # one pass over all fibers (one epoch) for both, the CPU preset's flow size
    cfg = {**CPU_PRESET, "meta_epochs": 1, "sub_epochs": 1, "warmup_epochs": 0, "fiber_batch": 256}
    ours = bench_vadlab(train, test_images, labels, cfg)
    import anomalib

    ref_backbone = CFlow(**cfg).backbone
    theirs = bench_anomalib(train_images, test_images, labels, cfg, ref_backbone)
    print(f"CFLOW-AD speed, {args.category} {args.size}px, {len(train)} train / {len(test_images)} test images, "
          f"EfficientNet-Lite0 {cfg['layers']}, {cfg['coupling_blocks']} blocks, P={cfg['condition_channels']}, "
          f"fiber batch 256, 1 epoch; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'implementation':<22}{'train fibers/s':>16}{'fit s':>9}{'infer ms/img':>14}{'image AUROC':>13}")
    for name, (fps, per_image, auroc, fit_s) in (("vadlab CFlow", ours), (f"anomalib {anomalib.__version__} Cflow", theirs)):
        print(f"{name:<22}{fps:>16.0f}{fit_s:>9.1f}{per_image * 1000:>14.1f}{auroc:>13.3f}")


if __name__ == "__main__":
    main()

"""Fit a method on defect-free images, score a test split, and collect metrics, timings and maps.

Data flows one way: images -> method -> scores and maps -> metrics -> files.  Nothing here looks at
test labels before the scores are final: no threshold, epoch or normalisation is chosen on the test set.
"""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vadlab.methods import AnomalyMethod, get_method
from vadlab.metrics import evaluate_all

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters and fitted buffers (a memory bank counts) that the method learnt or stores."""
    frozen = getattr(model, "frozen_prefixes", ("backbone.",))
    return sum(v.numel() for k, v in model.state_dict().items() if not k.startswith(frozen))


@dataclass
class EvalResult:
    """Everything a test run produced: metrics plus per-image arrays."""

    metrics: dict[str, Any]
    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    paths: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)


@torch.no_grad()
def predict_dataset(model: AnomalyMethod, dataset: Dataset, batch_size: int = 16,
                    desc: str = "predict") -> dict[str, Any]:
    """Run ``model.predict`` over a dataset of vadlab items; returns arrays and the seconds spent predicting."""
    from vadlab.data import make_loader

    model.eval()
    scores, maps, labels, masks, paths, defects = [], [], [], [], [], []
    seconds = 0.0
    for batch in tqdm(make_loader(dataset, batch_size=batch_size), desc=desc, leave=False):
        start = time.perf_counter()
        s, m = model.predict(batch["image"])
        seconds += time.perf_counter() - start
        if not torch.isfinite(s).all() or not torch.isfinite(m).all():
            bad = [p for p, ok in zip(batch["path"], torch.isfinite(m).flatten(1).all(1) & torch.isfinite(s)) if not ok]
            raise FloatingPointError(f"{model.name} produced NaN/inf scores for {len(bad)} images, e.g. {bad[:3]}; "
                                     "the model diverged: lower the learning rate or check its training loss")
        scores.append(s.cpu().numpy())
        maps.append(m.cpu().float().numpy())
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"][:, 0].numpy().astype(np.uint8))
        paths += list(batch["path"])
        defects += list(batch["defect"])
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps), "labels": np.concatenate(labels),
            "masks": np.concatenate(masks), "paths": paths, "defects": defects, "seconds": seconds}


def evaluate(model: AnomalyMethod, train_loader: Iterable, test_dataset: Dataset,
             batch_size: int = 16) -> EvalResult:
    """Fit ``model`` on ``train_loader`` (normal images only), score ``test_dataset``, compute all metrics."""
    start = time.perf_counter()
    model.fit(train_loader)
    fit_seconds = time.perf_counter() - start
    out = predict_dataset(model, test_dataset, batch_size)
    metrics = evaluate_all(out["labels"], out["scores"], out["masks"], out["maps"])
    metrics.update(fit_seconds=fit_seconds, predict_seconds_per_image=out["seconds"] / len(out["scores"]),
                   peak_memory_mb=peak_memory_mb(), n_parameters=count_parameters(model))
    return EvalResult(metrics, out["scores"], out["labels"], out["maps"], out["masks"], out["paths"], out["defects"])


def _write_outputs(result: EvalResult, out_dir: Path, n_overlays: int = 6) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result.metrics), indent=2, sort_keys=True) + "\n")
    np.savez_compressed(out_dir / "predictions.npz", scores=result.scores, labels=result.labels,
                        maps=result.maps.astype(np.float16), masks=result.masks,
                        paths=np.asarray(result.paths), defects=np.asarray(result.defects))
    from vadlab.visualize import save_overlays

    save_overlays(result, out_dir / "overlays", n=n_overlays)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def build_method(method: str, overrides: dict[str, Any] | None = None) -> AnomalyMethod:
    """Instantiate a method by name with hyperparameter overrides (strings are converted to the field types)."""
    return get_method(method)(**(overrides or {}))


def run(method: str, data: str | Path, category: str, image_size: int = 256,
        overrides: dict[str, Any] | None = None, out_dir: str | Path | None = None, seed: int = 0,
        batch_size: int = 16, save_model: bool = False) -> dict[str, Any]:
    """Per-category protocol: fit on ``<data>/<category>/train/good``, evaluate on ``test/``; returns metrics."""
    from vadlab.data import MVTecDataset, make_loader

    seed_everything(seed)
    train = MVTecDataset(data, category, "train", image_size)
    test = MVTecDataset(data, category, "test", image_size)
    model = build_method(method, overrides)
    result = evaluate(model, make_loader(train, batch_size=batch_size, shuffle=True, seed=seed), test, batch_size)
    result.metrics.update(method=method, category=category, protocol="per-category", seed=seed,
                          image_size=image_size, config=asdict(model.config))
    if out_dir is not None:
        _write_outputs(result, Path(out_dir))
        if save_model:
            model.save(Path(out_dir) / "model.pt")
    return result.metrics


def run_unified(method: str, data: str | Path, categories: list[str], image_size: int = 256,
                overrides: dict[str, Any] | None = None, out_dir: str | Path | None = None, seed: int = 0,
                batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Multi-class protocol: one model on every category's normal images, evaluated per category."""
    from torch.utils.data import ConcatDataset

    from vadlab.data import MVTecDataset, make_loader

    if not categories:
        raise ValueError("the unified protocol needs at least one category")
    seed_everything(seed)
    train = ConcatDataset([MVTecDataset(data, c, "train", image_size) for c in categories])
    model = build_method(method, overrides)
    start = time.perf_counter()
    model.fit(make_loader(train, batch_size=batch_size, shuffle=True, seed=seed))
    fit_seconds = time.perf_counter() - start
    results = {}
    for category in categories:
        out = predict_dataset(model, MVTecDataset(data, category, "test", image_size), batch_size, desc=category)
        metrics = evaluate_all(out["labels"], out["scores"], out["masks"], out["maps"])
        metrics.update(fit_seconds=fit_seconds, predict_seconds_per_image=out["seconds"] / len(out["scores"]),
                       peak_memory_mb=peak_memory_mb(), n_parameters=count_parameters(model), method=method,
                       category=category, protocol="unified", seed=seed, image_size=image_size,
                       config=asdict(model.config))
        results[category] = metrics
        if out_dir is not None:
            result = EvalResult(metrics, out["scores"], out["labels"], out["maps"], out["masks"], out["paths"],
                                out["defects"])
            _write_outputs(result, Path(out_dir) / category)
    return results

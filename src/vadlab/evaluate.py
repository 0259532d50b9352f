"""Fit a method on defect-free images, score a test split, and collect metrics, timings and maps.

Data flows one way: images -> method -> scores and maps -> metrics -> files.  Nothing here looks at
test labels before the scores are final: no threshold, epoch or normalisation is chosen on the test set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

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


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically (a temporary file, then ``os.replace``).

    NaN and infinity become ``null``; a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(value), indent=2) + "\n")
    os.replace(tmp, path)
    return path


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


#: GPU claimed by this process for ``device: auto`` (index, open lock file), so all its runs share it
_CLAIMED_GPU: dict[str, Any] = {}


def _claim_gpu(n_gpus: int, keys: list[str] | None = None, lock_dir: str | Path | None = None) -> int:
    """Index of a GPU for this process: the first one no other vadlab process holds, else shared by pid.

    Each GPU has a lock file (``$VADLAB_GPU_LOCK_DIR`` or the temp dir); a process keeps an exclusive
    ``flock`` on its GPU's file until it exits, so ``dvc queue start --jobs N`` on N GPUs runs one
    experiment per GPU without any scheduler. ``keys`` name the GPUs (their UUIDs, so processes that
    see different ``CUDA_VISIBLE_DEVICES`` do not collide); default: the indices.
    """
    import fcntl
    import tempfile

    if "index" in _CLAIMED_GPU:
        return int(_CLAIMED_GPU["index"])
    folder = Path(lock_dir or os.environ.get("VADLAB_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "vadlab-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    keys = keys or [str(i) for i in range(n_gpus)]
    for index, key in enumerate(keys):
        handle = open(folder / f"gpu-{key}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED_GPU.update(index=index, handle=handle)
        return index
    return os.getpid() % n_gpus  # more processes than GPUs: share


def resolve_device(device: str) -> str:
    """``auto`` -> a CUDA device when one is available (one per process, see :func:`_claim_gpu`), else ``cpu``.

    Any other value is checked and returned as is; asking for CUDA on a machine without it is an error
    that says to use ``auto`` or ``cpu``.
    """
    device = str(device).strip().lower()
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        n = torch.cuda.device_count()
        keys = [str(getattr(torch.cuda.get_device_properties(i), "uuid", i)) for i in range(n)]
        return f"cuda:{_claim_gpu(n, keys)}"
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device auto "
                         "(CUDA when available, else CPU) or cpu")
    return device


def build_method(method: str, overrides: dict[str, Any] | None = None, seed: int = 0) -> AnomalyMethod:
    """Instantiate a method by name with hyperparameter overrides (strings are converted to the field types).

    The run's ``seed`` offsets the method's own ``Config.seed`` (initial weights, random channels or
    projections; its official default at seed 0), so repeated runs with seeds 0, 1, 2 differ in every
    random choice. An explicit ``seed`` in ``overrides`` wins.
    """
    overrides = dict(overrides or {})
    if "device" in overrides:  # `auto`: CUDA when available, else CPU
        overrides["device"] = resolve_device(overrides["device"])
    cls = get_method(method)
    if "seed" not in overrides and "seed" in {f.name for f in fields(cls.Config)}:
        overrides["seed"] = int(cls.Config().seed) + int(seed)
    return cls(**overrides)


def run(method: str, data: str | Path, category: str, image_size: int = 256,
        overrides: dict[str, Any] | None = None, out_dir: str | Path | None = None, seed: int = 0,
        batch_size: int = 16, save_model: bool = False) -> dict[str, Any]:
    """Per-category protocol: fit on ``<data>/<category>/train/good``, evaluate on ``test/``; returns metrics."""
    from vadlab.data import MVTecDataset, make_loader

    seed_everything(seed)
    train = MVTecDataset(data, category, "train", image_size)
    test = MVTecDataset(data, category, "test", image_size)
    model = build_method(method, overrides, seed)
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
    model = build_method(method, overrides, seed)
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


def run_parallel(fn: Callable[..., Any], calls: list[dict[str, Any]], jobs: int, executor: str = "local",
                 ray_address: str | None = None) -> list[Any]:
    """``fn(**kwargs)`` for every kwargs in ``calls``, ``jobs`` at a time in worker processes (1: in this one).

    ``executor="ray"`` runs each call as a task on a Ray cluster instead (``ray_address``; ``None``: a Ray
    instance on this machine), one GPU per CUDA run; see :mod:`vadlab.cluster`. ``jobs`` is then unused:
    the cluster's resources decide how many runs go at once.

    The pipeline's runs (categories, seeds, digits) are independent, so they run in separate spawned
    processes that share the CPU threads (``OMP_NUM_THREADS`` split between them); results come back in
    the order of ``calls``. Each run seeds itself, so ``jobs`` changes the wall-clock time, not the numbers
    (beyond floating-point rounding).
    """
    if executor == "ray":
        from vadlab.cluster import run_on_ray

        return run_on_ray(fn, calls, address=ray_address)
    if executor != "local":
        raise ValueError(f"executor {executor!r} is not one of local, ray (params.yaml `executor`)")
    n = max(1, min(int(jobs), len(calls)))
    if n == 1:
        return [fn(**kwargs) for kwargs in calls]
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)) // n)
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    try:  # spawned children read the environment at start-up
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fn, **kwargs) for kwargs in calls]
            return [f.result() for f in futures]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""Fit a method on defect-free images, score a test split, and collect metrics, timings and maps.

Data flows one way: images -> method -> scores and maps -> metrics -> files.  Nothing here looks at
test labels before the scores are final: no threshold, epoch or normalisation is chosen on the test set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
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

from vadlab import fileio
from vadlab.methods import AnomalyMethod, get_method
from vadlab.metrics import evaluate_all

log = logging.getLogger("vadlab")

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max")
PIXEL_KEYS = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1max")  # None without pixel masks
#: what a run writes into its folder; ``metrics.json`` is written last and marks the run complete
RUN_OUTPUTS = ("metrics.json", "predictions.npz", "scores.csv", "curves", "history.csv", "overlays", "model.pt")
#: what to do with an ``out_dir`` that holds a finished run
EXISTING = ("refuse", "reuse", "overwrite")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same seed gives the same numbers; flush denormals to zero.

    Denormal floats (magnitudes below about 1e-38) appear in trained networks' weights and gradients
    and cost some CPUs tens of cycles per operation: AE-SSIM's 80-epoch CPU fit took 69 s with them
    and 31 s flushed (1 thread, same machine and load). Flushing changes no result beyond rounding.
    """
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Linux lets a process reset its peak resident memory (VmHWM) by writing 5 to /proc/self/clear_refs
PEAK_RESET = os.path.exists("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new peak-memory measurement in this process (Linux: resets the kernel's VmHWM).

    A pipeline worker process runs several runs; without the reset each would report the largest peak
    of every earlier run in it. Where no reset exists, :func:`run_parallel` gives every run a fresh
    process instead.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_memory` (Linux), else since start, in MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux KiB (macOS bytes: rough)


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
    scores, maps, labels, masks, has_mask, paths, defects = [], [], [], [], [], [], []
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
        has_mask.append(np.asarray(batch.get("has_mask", [True] * len(s)), dtype=bool))
        paths += list(batch["path"])
        defects += list(batch["defect"])
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps), "labels": np.concatenate(labels),
            "masks": np.concatenate(masks), "has_mask": np.concatenate(has_mask), "paths": paths, "defects": defects,
            "seconds": seconds}


def score_metrics(out: dict[str, Any]) -> dict[str, Any]:
    """Image and pixel metrics of :func:`predict_dataset`'s output.

    Where some defective images have no pixel mask (image-level labels only), the pixel metrics are
    None (JSON null) and ``pixel_metrics_missing`` says why: they are never computed on invented masks.
    """
    unlabelled = [p for p, ok in zip(out["paths"], out["has_mask"]) if not ok]
    if not unlabelled:
        return evaluate_all(out["labels"], out["scores"], out["masks"], out["maps"])
    metrics = evaluate_all(out["labels"], out["scores"])
    folders = sorted({str(Path(p).parent) for p in unlabelled})
    metrics.update(dict.fromkeys(PIXEL_KEYS, None), pixel_metrics_missing=(
        f"image-level labels only: {len(unlabelled)} of {int(np.sum(out['labels']))} defective test images have "
        f"no ground-truth mask (no ground_truth/<defect>/ folder for {', '.join(folders)})"))
    return metrics


def evaluate(model: AnomalyMethod, train_loader: Iterable, test_dataset: Dataset,
             batch_size: int = 16) -> EvalResult:
    """Fit ``model`` on ``train_loader`` (normal images only), score ``test_dataset``, compute all metrics."""
    start = time.perf_counter()
    model.fit(train_loader)
    fit_seconds = time.perf_counter() - start
    result = score(model, test_dataset, batch_size)
    result.metrics.update(fit_seconds=fit_seconds, n_parameters=count_parameters(model))
    return result


def score(model: AnomalyMethod, test_dataset: Dataset, batch_size: int = 16, desc: str = "predict") -> EvalResult:
    """Score ``test_dataset`` with a fitted ``model`` and compute every metric (no fitting)."""
    out = predict_dataset(model, test_dataset, batch_size, desc=desc)
    metrics = score_metrics(out)
    metrics.update(per_defect_image_auroc=per_defect_auroc(out["labels"], out["scores"], out["defects"]),
                   predict_seconds_per_image=out["seconds"] / len(out["scores"]), peak_memory_mb=peak_memory_mb())
    return EvalResult(metrics, out["scores"], out["labels"], out["maps"], out["masks"], out["paths"], out["defects"])


def per_defect_auroc(labels: np.ndarray, scores: np.ndarray, defects: list[str]) -> dict[str, float | None]:
    """Image AUROC of each defect type against the normal images (None without normal images)."""
    from vadlab.metrics import image_auroc

    labels, defects = np.asarray(labels), np.asarray(defects)
    normal = labels == 0
    out: dict[str, float | None] = {}
    for defect in sorted(set(defects[labels == 1].tolist())):
        pick = normal | ((defects == defect) & (labels == 1))
        out[defect] = image_auroc(labels[pick], scores[pick]) if normal.any() else None
    return out


def _thin(x: np.ndarray, y: np.ndarray, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points of the curve (x, y), evenly spaced in index, first and last kept."""
    if len(x) <= n:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return x[keep], y[keep]


def curves(result: EvalResult) -> dict[str, tuple[tuple[str, str], np.ndarray, np.ndarray]]:
    """ROC and PR curves of the image scores, pixel ROC and PRO curves of the maps: name -> (columns, x, y).

    Pixel curves are left out when no test image has a defect mask, or when some defective images have none
    (image-level-only datasets: ``pixel_metrics_missing``); they are never drawn on invented masks.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    from vadlab.metrics import pro_curve

    out = {}
    labels = np.asarray(result.labels)
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, result.scores)
        out["image_roc"] = (("fpr", "tpr"), fpr, tpr)
        precision, recall, _ = precision_recall_curve(labels, result.scores)
        out["image_pr"] = (("recall", "precision"), recall[::-1], precision[::-1])
    masks = np.asarray(result.masks)
    if masks.any() and not masks.all() and not result.metrics.get("pixel_metrics_missing"):
        fpr, tpr, _ = roc_curve(masks.reshape(-1), result.maps.reshape(-1).astype(np.float32))
        out["pixel_roc"] = (("fpr", "tpr"), *_thin(fpr, tpr))
        fpr, pro = pro_curve(masks, result.maps)
        out["pro"] = (("fpr", "pro"), *_thin(np.asarray(fpr), np.asarray(pro)))
    return out


def _csv_text(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def history_rows(model: AnomalyMethod) -> tuple[list[str], list[list[Any]]] | None:
    """The method's training history as CSV (header, rows): per-epoch ``history`` or per-stage ``losses``."""
    history = getattr(model, "history", None)
    if history:
        header = list(dict.fromkeys(k for entry in history for k in entry))
        if "epoch" not in header:
            header.insert(0, "epoch")
            history = [{"epoch": i, **entry} for i, entry in enumerate(history)]
        return header, [[entry.get(k, "") for k in header] for entry in history]
    losses = getattr(model, "losses", None)
    if isinstance(losses, dict) and losses:
        rows = [[stage, i, float(v)] for stage, values in losses.items() for i, v in enumerate(values or [])]
        return (["stage", "step", "loss"], rows) if rows else None
    return None


def finished_run_error(out_dir: Path) -> FileExistsError:
    """The error for a folder that holds a finished run when the user did not say to reuse or redo it."""
    return FileExistsError(f"{out_dir} holds a finished run (metrics.json); pass --existing reuse to keep it, "
                           "--existing overwrite to redo it, or choose another --out")


def prepare_out_dir(out_dir: Path, existing: str = "overwrite") -> dict[str, Any] | None:
    """Make ``out_dir`` ready for a run: the finished run's metrics when ``existing='reuse'``, else None.

    A folder with ``metrics.json`` holds a finished run: ``refuse`` raises, ``reuse`` returns its metrics,
    ``overwrite`` removes it. A folder without it holds nothing or an unfinished run: its outputs are
    removed and the run is redone. Files that are not run outputs are left alone.
    """
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {', '.join(EXISTING)}, got {existing!r}")
    fileio.check_writable(out_dir)
    marker = out_dir / "metrics.json"
    if marker.is_file():
        if existing == "refuse":
            raise finished_run_error(out_dir)
        if existing == "reuse":
            log.info("reusing the finished run in %s", out_dir)
            return json.loads(marker.read_text())
    elif any((out_dir / name).exists() for name in RUN_OUTPUTS):
        log.info("%s holds an unfinished run: redoing it", out_dir)
    fileio.remove_stale(out_dir, RUN_OUTPUTS)
    return None


def write_outputs(result: EvalResult, out_dir: Path, n_overlays: int = 6, model: AnomalyMethod | None = None,
                  save_model: bool = False) -> None:
    """Write a run's files into ``out_dir``, each atomically, ``metrics.json`` last (the run's "complete" mark)."""
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    with fileio.atomic_path(out_dir / "predictions.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, scores=result.scores, labels=result.labels, maps=result.maps.astype(np.float16),
                            masks=result.masks, paths=np.asarray(result.paths), defects=np.asarray(result.defects))
    fileio.write_text(out_dir / "scores.csv", _csv_text(
        ["path", "defect", "label", "score"],
        ([p, d, int(l), float(s)] for p, d, l, s in zip(result.paths, result.defects, result.labels, result.scores))))
    for name, (columns, x, y) in curves(result).items():
        fileio.write_text(out_dir / "curves" / f"{name}.csv", _csv_text(list(columns), zip(x.tolist(), y.tolist())))
    history = history_rows(model) if model is not None else None
    if history is not None:
        fileio.write_text(out_dir / "history.csv", _csv_text(*history))
    from vadlab.visualize import save_overlays

    save_overlays(result, out_dir / "overlays", n=n_overlays)
    if save_model and model is not None:
        model.save(out_dir / "model.pt", {k: result.metrics.get(k) for k in ("image_size", "category", "data")
                                           if k in result.metrics})
    fileio.write_json(out_dir / "metrics.json", _jsonable(result.metrics))


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically (a temporary file, then ``os.replace``).

    NaN and infinity become ``null``; a reader never sees a half-written file.
    """
    return fileio.write_text(path, json.dumps(_jsonable(value), indent=2) + "\n")


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
        batch_size: int = 16, save_model: bool = False, existing: str = "overwrite") -> dict[str, Any]:
    """Per-category protocol: fit on ``<data>/<category>/train/good``, evaluate on ``test/``; returns metrics.

    ``existing`` says what to do when ``out_dir`` holds a finished run (see :func:`prepare_out_dir`).
    """
    from vadlab.data import MVTecDataset, make_loader

    if out_dir is not None:
        reused = prepare_out_dir(Path(out_dir), existing)
        if reused is not None:
            return reused
    reset_peak_memory()
    seed_everything(seed)
    train = MVTecDataset(data, category, "train", image_size)
    test = MVTecDataset(data, category, "test", image_size)
    model = build_method(method, overrides, seed)
    model.check_input_size(image_size)
    result = evaluate(model, make_loader(train, batch_size=batch_size, shuffle=True, seed=seed), test, batch_size)
    result.metrics.update(method=method, category=category, protocol="per-category", seed=seed,
                          image_size=image_size, data=str(data), config=asdict(model.config))
    if out_dir is not None:
        write_outputs(result, Path(out_dir), model=model, save_model=save_model)
    return result.metrics


def run_unified(method: str, data: str | Path, categories: list[str], image_size: int = 256,
                overrides: dict[str, Any] | None = None, out_dir: str | Path | None = None, seed: int = 0,
                batch_size: int = 16, existing: str = "overwrite") -> dict[str, dict[str, Any]]:
    """Multi-class protocol: one model on every category's normal images, evaluated per category."""
    from torch.utils.data import ConcatDataset

    from vadlab.data import MVTecDataset, make_loader

    if not categories:
        raise ValueError("the unified protocol needs at least one category")
    if out_dir is not None:  # one model for all categories: reuse only when every category is finished
        reused = {c: prepare_out_dir(Path(out_dir) / c, existing) for c in categories}
        if all(m is not None for m in reused.values()):
            return reused
        for category, metrics in reused.items():
            if metrics is not None:
                prepare_out_dir(Path(out_dir) / category, "overwrite")
    reset_peak_memory()
    seed_everything(seed)
    train = ConcatDataset([MVTecDataset(data, c, "train", image_size) for c in categories])
    model = build_method(method, overrides, seed)
    model.check_input_size(image_size)
    start = time.perf_counter()
    model.fit(make_loader(train, batch_size=batch_size, shuffle=True, seed=seed))
    fit_seconds = time.perf_counter() - start
    results = {}
    for category in categories:
        result = score(model, MVTecDataset(data, category, "test", image_size), batch_size, desc=category)
        result.metrics.update(fit_seconds=fit_seconds, n_parameters=count_parameters(model), method=method,
                              category=category, protocol="unified", seed=seed, image_size=image_size,
                              data=str(data), config=asdict(model.config))
        results[category] = result.metrics
        if out_dir is not None:
            write_outputs(result, Path(out_dir) / category, model=model)
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
        # where the peak cannot be reset (not Linux), one fresh process per run, so its peak memory is its
        # own; on Linux workers are reused (a process start and torch import cost seconds per run)
        fresh = None if PEAK_RESET else 1
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=fresh) as pool:
            futures = [pool.submit(fn, **kwargs) for kwargs in calls]
            return [f.result() for f in futures]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

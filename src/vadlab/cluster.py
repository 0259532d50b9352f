"""The pipeline's runs on a Ray cluster: one Ray task per run, one GPU per CUDA run.

``vadlab.evaluate.run_parallel(..., executor="ray")`` hands every run (one method on one category and
seed, one unified model, one digit) to :func:`run_on_ray`. Ray schedules the tasks over the cluster's
nodes by the resources each asks for: ``num_gpus=1`` when the run's ``device`` is CUDA (``auto`` on a
cluster that has GPUs, ``cuda``, ``cuda:N``), otherwise ``cpus_per_run`` CPUs. Ray sets
``CUDA_VISIBLE_DEVICES`` to the task's own GPU, so the run uses ``cuda:0`` of what it sees, and no two
runs share a GPU. Each task runs in a fresh worker process (``max_calls=1``): a GPU is never reused by a
process that initialised CUDA for another one, and the run's peak memory is its own.

Outputs come back to the head. A task writes its run's files into a temporary folder on its node and
returns them with the run's result; the driver (the ``dvc repro`` process on the head) writes them under
the run's ``out_dir`` there, as each task finishes. So the cluster needs no shared file system for the
results, and DVC finds every output in the workspace where it runs. The inputs must be on every node at
the same path (the dataset: ``dvc pull`` or a copy on each node, or a shared mount), and every node needs
the same vadlab and Python packages.

A run that raises does not stop the others: every task is waited for, the finished runs' outputs are
written, then :class:`RunsFailed` names each failed run (method, category, seed) with its error. Called
again with ``existing="reuse"`` in the calls, only the runs without a ``metrics.json`` are sent again.
Ray is an optional extra: ``pip install 'vadlab[cluster]'``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

INSTALL_HINT = "pip install 'vadlab[cluster]' (or pip install ray)"


class RunsFailed(RuntimeError):
    """Some runs raised; ``failures`` holds ``(description, error text)`` for each, in call order."""

    def __init__(self, failures: list[tuple[str, str]], n_runs: int) -> None:
        self.failures = failures
        lines = "\n".join(f"  - {what}: {error.strip().splitlines()[-1] if error.strip() else error}"
                          for what, error in failures)
        super().__init__(f"{len(failures)} of {n_runs} runs failed on the Ray cluster (the other runs' outputs "
                         f"are written; a rerun redoes only what is missing):\n{lines}")


def describe(kwargs: dict[str, Any]) -> str:
    """A run's identity for messages: ``method=padim category=brick seed=1``."""
    keys = ("method", "method_name", "category", "categories", "digits", "seed")
    return " ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs) or repr(kwargs)


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"executor 'ray' needs Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


def _wants_gpu(kwargs: dict[str, Any], cluster_gpus: float) -> bool:
    device = str((kwargs.get("overrides") or {}).get("device", "cpu")).strip().lower()
    if device == "auto":
        return cluster_gpus > 0
    if device.startswith("cuda"):
        if cluster_gpus <= 0:
            raise ValueError(f"run {describe(kwargs)} asks for device {device!r}, but the Ray cluster has no GPU; "
                             "use device auto (CUDA when the cluster has GPUs, else CPU) or cpu")
        return True
    return False


def _task(fn: Callable[..., Any], kwargs: dict[str, Any], cpus: int, gpu: bool) -> tuple[Any, dict[str, bytes]]:
    """Body of one Ray task: run ``fn`` on this node, return its result and the files it wrote."""
    import torch

    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(max(1, cpus))
    kwargs = dict(kwargs)
    if gpu:  # Ray made the assigned GPU the only visible one: no lock file (resolve_device's `auto`) needed
        kwargs["overrides"] = {**(kwargs.get("overrides") or {}), "device": "cuda:0"}
    else:  # a CPU run must not touch a GPU another run holds (Ray leaves the variable alone without GPUs)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out_dir = kwargs.get("out_dir")
    if out_dir is None:
        return fn(**kwargs), {}
    scratch = Path(tempfile.mkdtemp(prefix="vadlab-run-"))
    try:
        result = fn(**{**kwargs, "out_dir": scratch / "out"})
        files = {str(p.relative_to(scratch / "out")): p.read_bytes()
                 for p in sorted((scratch / "out").rglob("*")) if p.is_file()}
        return result, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_files(out_dir: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write a run's returned files under ``out_dir``, each atomically, ``metrics.json`` (the marker) last."""
    from vadlab import fileio

    for name in sorted(files, key=lambda n: (Path(n).name == "metrics.json", n)):
        with fileio.atomic_path(Path(out_dir) / name) as tmp:
            tmp.write_bytes(files[name])


def _reusable(kwargs: dict[str, Any]) -> Any:
    """The stored result of a finished run that the call asks to reuse (``existing="reuse"``), else None.

    Checked on the driver, where the outputs are, before anything is sent to the cluster: after a failure,
    a rerun with ``existing="reuse"`` sends only the runs that have no ``metrics.json`` yet.
    """
    if kwargs.get("existing") != "reuse" or kwargs.get("out_dir") is None:
        return None
    out_dir = Path(kwargs["out_dir"])
    if "categories" in kwargs:  # one unified model: reused only when every category finished
        markers = {c: out_dir / c / "metrics.json" for c in kwargs["categories"]}
        if all(m.is_file() for m in markers.values()):
            return {c: json.loads(m.read_text()) for c, m in markers.items()}
        return None
    marker = out_dir / "metrics.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_on_ray(fn: Callable[..., Any], calls: list[dict[str, Any]], address: str | None = None,
               cpus_per_run: int = 1) -> list[Any]:
    """``fn(**kwargs)`` for every kwargs in ``calls`` as Ray tasks; results in the order of ``calls``.

    ``address``: a running cluster (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:10001"``); ``None`` starts
    a Ray instance on this machine for the duration of the call.
    """
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        results: list[Any] = [None] * len(calls)
        index = {}
        for i, kwargs in enumerate(calls):
            results[i] = _reusable(kwargs)
            if results[i] is not None:
                continue
            gpu = _wants_gpu(kwargs, cluster_gpus)
            remote = ray.remote(num_cpus=cpus_per_run, num_gpus=1 if gpu else 0, max_calls=1, max_retries=0)(_task)
            index[remote.remote(fn, kwargs, cpus_per_run, gpu)] = i
        failures: dict[int, tuple[str, str]] = {}
        pending = list(index)
        while pending:  # as each run finishes, its outputs are written on the head
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                result, files = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a failed run is reported with its identity below
                cause = getattr(err, "cause", None) or err
                failures[i] = (describe(calls[i]), f"{type(cause).__name__}: {cause}")
                continue
            if files:
                _write_files(calls[i]["out_dir"], files)
            results[i] = result
        if failures:
            raise RunsFailed([failures[i] for i in sorted(failures)], len(calls))
        return results
    finally:
        if started_here:
            ray.shutdown()

"""A run's folder: atomic files, metrics.json last, kills never leave complete-looking wrong output,
reruns redo unfinished runs and reuse or refuse finished ones; per-defect AUROC, curves, history."""

import contextlib
import csv
import json
import mmap
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vadlab import fileio
from vadlab.cli import main
from vadlab.data import generate
from vadlab.evaluate import EvalResult, history_rows, run_parallel, write_outputs

ARGS = ["--category", "brick", "--image-size", "64", "--set", "n_features=16"]


@pytest.fixture(scope="module")
def finished(root, tmp_path_factory):
    """One finished evaluate run (its folder and the EvalResult rebuilt from its files)."""
    out = tmp_path_factory.mktemp("run") / "padim"
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), *ARGS]) == 0
    saved = np.load(out / "predictions.npz")
    metrics = json.loads((out / "metrics.json").read_text())
    result = EvalResult(metrics, saved["scores"], saved["labels"], saved["maps"].astype(np.float32), saved["masks"],
                        saved["paths"].tolist(), saved["defects"].tolist())
    return out, result


class Crash(Exception):
    pass


def test_a_crash_at_any_write_leaves_no_complete_looking_run(finished, tmp_path, monkeypatch):
    _, result = finished
    real = fileio.replace
    calls = []
    monkeypatch.setattr(fileio, "replace", lambda src, dst: (calls.append(dst), real(src, dst)))
    write_outputs(result, tmp_path / "count")
    n_writes = len(calls)
    assert calls[-1].name == "metrics.json" and n_writes >= 8  # every file goes through replace, metrics last
    for k in range(n_writes):
        out = tmp_path / f"crash{k}"
        done = []

        def crash_at_k(src, dst):
            if len(done) == k:
                raise Crash(dst)
            done.append(dst)
            real(src, dst)

        monkeypatch.setattr(fileio, "replace", crash_at_k)
        with pytest.raises(Crash):
            write_outputs(result, out)
        assert not (out / "metrics.json").exists(), k
        assert not [p for p in out.rglob("*") if p.name.endswith(fileio.TMP_SUFFIX)]  # temp files cleaned up
        if (out / "predictions.npz").exists():  # whatever exists is whole
            assert len(np.load(out / "predictions.npz")["scores"]) == 8


def test_sigkill_before_metrics_then_rerun_redoes_the_run(root, tmp_path):
    """A real SIGKILL (no cleanup runs) just before metrics.json is renamed into place."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal
        from vadlab import fileio
        from vadlab.cli import main
        real = fileio.replace
        def replace(src, dst):
            if dst.name == "metrics.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        fileio.replace = replace
        main(["evaluate", "padim", "--data", {str(root)!r}, "--out", {str(out)!r}, *{ARGS!r}])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    assert not (out / "metrics.json").exists()
    assert list(out.glob(".metrics.json.*" + fileio.TMP_SUFFIX))  # the kill left the unrenamed temp file
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), *ARGS]) == 0  # unfinished: redone
    assert json.loads((out / "metrics.json").read_text())["category"] == "brick"
    assert not list(out.glob(f".*{fileio.TMP_SUFFIX}"))


def test_finished_run_is_refused_reused_or_overwritten_and_stale_files_go(root, finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for name, content in (("metrics.json", '{"image_auroc": 0.5, "category": "old"}'), ("history.csv", "x")):
        (out / name).write_text(content)
    (out / "overlays").mkdir()
    (out / "overlays" / "old_defect_000.png").write_bytes(b"stale")
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), *ARGS]) == 2
    assert "--existing" in capsys.readouterr().err
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), "--existing", "reuse", *ARGS]) == 0
    assert json.loads((out / "metrics.json").read_text())["category"] == "old"
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), "--existing", "overwrite", *ARGS]) == 0
    assert json.loads((out / "metrics.json").read_text())["category"] == "brick"
    assert not (out / "overlays" / "old_defect_000.png").exists() and not (out / "history.csv").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a run output: left alone


def test_unfinished_run_is_redone_without_a_flag(root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.npz").write_bytes(b"truncated")
    assert main(["evaluate", "padim", "--data", str(root), "--out", str(out), *ARGS]) == 0
    assert len(np.load(out / "predictions.npz")["scores"]) == 8


def test_per_defect_auroc_and_curve_files(finished):
    out, result = finished
    metrics = json.loads((out / "metrics.json").read_text())
    per_defect = metrics["per_defect_image_auroc"]
    defects, labels = np.asarray(result.defects), np.asarray(result.labels)
    assert set(per_defect) == set(defects[labels == 1]) and len(per_defect) >= 2
    for defect, value in per_defect.items():
        pick = (labels == 0) | (defects == defect)
        assert value == pytest.approx(roc_auc_score(labels[pick], result.scores[pick]))
    roc = list(csv.DictReader(open(out / "curves" / "image_roc.csv")))
    fpr, tpr = np.array([float(r["fpr"]) for r in roc]), np.array([float(r["tpr"]) for r in roc])
    assert np.all(np.diff(fpr) >= 0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics["image_auroc"], abs=1e-6)
    for name, columns in (("image_pr", ["recall", "precision"]), ("pixel_roc", ["fpr", "tpr"]),
                          ("pro", ["fpr", "pro"])):
        with open(out / "curves" / f"{name}.csv") as fh:
            assert next(csv.reader(fh)) == columns
    scores = list(csv.DictReader(open(out / "scores.csv")))
    assert len(scores) == 8 and {r["defect"] for r in scores} >= {"good"}


def test_training_history_rows():
    epochs = SimpleNamespace(history=[{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}])
    assert history_rows(epochs) == (["epoch", "loss"], [[0, 2.0], [1, 1.5]])
    stages = SimpleNamespace(losses={"ae": [3.0, 2.0], "ldm": [1.0]})
    assert history_rows(stages) == (["stage", "step", "loss"], [["ae", 0, 3.0], ["ae", 1, 2.0], ["ldm", 0, 1.0]])
    assert history_rows(SimpleNamespace()) is None


def test_evaluate_saves_the_training_history(root, tmp_path):
    out = tmp_path / "run"
    assert main(["evaluate", "mkd", "--data", str(root), "--category", "brick", "--image-size", "64", "--preset",
                 "cpu", "--set", "epochs=2", "--set", "image_size=64", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and all(float(r["loss"]) > 0 for r in rows)


@contextlib.contextmanager
def _touched_pages(mib: int):
    """Map ``mib`` MiB of fresh pages and touch every one; they are unmapped when the block ends.

    An anonymous mapping, not ``np.ones``: malloc may serve a large block from free heap pages that
    are already resident (after earlier tests freed memory) and keep them after ``del``, so the
    resident size neither rises nor falls and a peak-memory test measures the allocator, not the reset.
    """
    if mib == 0:
        yield
        return
    with mmap.mmap(-1, mib * 2**20) as block:
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[:] = 1
        del pages  # the mapping cannot close while a view exports it
        yield


def _allocate_and_measure(mib: int) -> float:
    """A run as `vadlab.evaluate.run` measures it: reset the peak, work (touch ``mib`` MiB), read the peak."""
    from vadlab.evaluate import peak_memory_mb, reset_peak_memory

    reset_peak_memory()
    with _touched_pages(mib):
        pass
    return peak_memory_mb()


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_parallel_reports_each_runs_own_peak_memory(jobs):
    """A reused process (this one with jobs=1, a pool worker with 2) once reported every earlier run's peak."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("per-run reset needs Linux /proc; elsewhere every run gets a fresh process")
    peaks = run_parallel(_allocate_and_measure, [{"mib": 600}, {"mib": 0}, {"mib": 0}, {"mib": 0}], jobs=jobs)
    assert max(peaks[1:]) < peaks[0] - 400, peaks  # the big run's peak did not leak into the runs after it


def test_peak_memory_is_measured_per_run():
    from vadlab.evaluate import peak_memory_mb, reset_peak_memory

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("per-run reset needs Linux /proc")
    with _touched_pages(300):
        with_big = peak_memory_mb()
    reset_peak_memory()
    assert peak_memory_mb() < with_big - 200


def test_refusal_comes_before_the_first_category_is_fitted(root, tmp_path, capsys, monkeypatch):
    two = generate(tmp_path / "two", seed=1, categories=["brick", "grass"], n_train=4, n_test=4, size=32)
    out = tmp_path / "runs"
    (out / "grass").mkdir(parents=True)
    (out / "grass" / "metrics.json").write_text("{}")
    import vadlab.evaluate

    monkeypatch.setattr(vadlab.evaluate, "build_method", lambda *a, **k: pytest.fail("fitted before refusing"))
    for protocol in ("per-category", "unified"):
        assert main(["evaluate", "padim", "--data", str(two), "--out", str(out), "--protocol", protocol]) == 2
        assert "grass" in capsys.readouterr().err

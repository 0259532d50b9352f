"""The `ray` executor (vadlab.cluster): the pipeline's runs as Ray tasks, on a real local Ray cluster.

Each test starts its own cluster with the `ray` command (a head, and for the two-node test one more
node joining it), in its own temporary directory and on free ports, and stops every Ray process it
started. GPUs are Ray's fake resources (`--num-gpus 2` on a CPU machine): Ray schedules and isolates
them exactly as real ones, which is what the executor relies on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray executor is an optional extra: pip install 'vadlab[cluster]'")

import ray_probes  # noqa: E402  (tests/ray_probes.py: task functions the workers import)

from vadlab.cluster import RunsFailed  # noqa: E402
from vadlab.data import generate  # noqa: E402
from vadlab.evaluate import run, run_parallel  # noqa: E402

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Ray cluster of ``ray start`` processes on this machine; ``stop()`` ends every one of them."""

    def __init__(self) -> None:
        # a short path: Ray's socket paths must stay under the 107-character limit of Unix sockets
        self.tmp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}

    def _ray(self, *args: str) -> None:
        proc = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start_head(self, cpus: int, gpus: int = 0) -> None:
        self._ray("start", "--head", f"--port={self.port}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                  "--include-dashboard=false", f"--temp-dir={self.tmp}", "--object-store-memory=80000000",
                  "--disable-usage-stats", f"--min-worker-port={self.port + 1}", f"--max-worker-port={self.port + 200}")

    def add_node(self, cpus: int) -> None:
        self._ray("start", f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0",
                  "--object-store-memory=80000000", f"--min-worker-port={self.port + 201}",
                  f"--max-worker-port={self.port + 400}")

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture()
def cluster(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster()
    yield c
    c.stop()


def test_two_node_cluster_gives_the_local_executors_metrics(cluster, tmp_path):
    cluster.start_head(cpus=2)
    cluster.add_node(cpus=1)
    data = tmp_path / "data"
    generate(data, seed=0, categories=["brick", "grass"], n_train=8, n_test=8, size=64)
    calls = [dict(method="padim", data=str(data), category=c, image_size=64, seed=s,
                  overrides={"n_features": 16}, out_dir=str(tmp_path / "ray" / c / f"seed{s}"))
             for c in ("brick", "grass") for s in (0, 1)]
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    on_ray = run_parallel(run, calls, jobs=1, executor="ray")
    ray.shutdown()
    local = run_parallel(run, [{**c, "out_dir": c["out_dir"].replace("/ray/", "/local/")} for c in calls], jobs=1)
    for call, r, lo in zip(calls, on_ray, local):
        assert (r["category"], r["seed"]) == (call["category"], call["seed"])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert r[key] == pytest.approx(lo[key], abs=1e-6), (call, key)
        # the outputs came back to the driver and were written where the run asked
        out = Path(call["out_dir"])
        assert (out / "metrics.json").is_file() and (out / "predictions.npz").is_file()
    assert on_ray[0]["image_auroc"] != on_ray[1]["image_auroc"] or on_ray[0]["aupro"] != on_ray[1]["aupro"]


def test_each_gpu_run_gets_its_own_gpu_and_never_shares_it(cluster):
    cluster.start_head(cpus=4, gpus=2)
    calls = [dict(name=f"gpu{i}", seconds=1.5, overrides={"device": "auto"}) for i in range(4)]
    calls.append(dict(name="cpu", seconds=0.1, overrides={"device": "cpu"}))
    records = run_parallel(ray_probes.record_gpu, calls, jobs=1, executor="ray", ray_address=cluster.address)
    gpu_runs = records[:4]
    assert all(r["visible"] in ("0", "1") for r in gpu_runs), gpu_runs  # one GPU each, set by Ray
    assert all(r["device"] == "cuda:0" for r in gpu_runs)  # the run uses the one GPU it sees
    assert records[4]["visible"] == "" and records[4]["device"] == "cpu"  # a CPU run sees no GPU
    for i, a in enumerate(gpu_runs):
        for b in gpu_runs[i + 1:]:
            if a["visible"] == b["visible"]:  # the same GPU: one after the other, never at once
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    assert {r["visible"] for r in gpu_runs} == {"0", "1"}  # both GPUs were used
    assert len({r["pid"] for r in gpu_runs}) == 4  # a fresh worker process per run


def test_a_failed_run_is_named_the_others_are_kept_and_a_rerun_redoes_only_it(cluster, tmp_path):
    cluster.start_head(cpus=2)
    log = tmp_path / "calls.log"
    calls = [dict(method="padim", category=c, seed=s, out_dir=str(tmp_path / c / f"seed{s}"), log=str(log),
                  fail=(c, s) == ("grass", 1), existing="reuse") for c in ("brick", "grass") for s in (0, 1)]
    with pytest.raises(RunsFailed) as info:
        run_parallel(ray_probes.write_or_fail, calls, jobs=1, executor="ray", ray_address=cluster.address)
    message = str(info.value)
    assert "1 of 4 runs failed" in message
    assert "method=padim category=grass seed=1" in message and "told to fail" in message
    assert [what for what, _ in info.value.failures] == ["method=padim category=grass seed=1"]
    for call in calls:  # the finished runs' outputs were written on the driver; the failed one has none
        assert (Path(call["out_dir"]) / "metrics.json").is_file() == (not call["fail"])
    assert sorted(log.read_text().split("\n")[:-1]) == ["brick 0", "brick 1", "grass 0", "grass 1"]
    log.unlink()
    fixed = [{**call, "fail": False} for call in calls]
    results = run_parallel(ray_probes.write_or_fail, fixed, jobs=1, executor="ray", ray_address=cluster.address)
    assert log.read_text() == "grass 1\n"  # only the failed run was sent again
    assert [r["image_auroc"] for r in results] == [0.5, 0.6, 0.5, 0.6]  # the others' stored results


def test_executor_names_are_checked():
    with pytest.raises(ValueError, match="executor 'dask' is not one of local, ray"):
        run_parallel(ray_probes.record_gpu, [dict(name="x", seconds=0)], jobs=1, executor="dask")

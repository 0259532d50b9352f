"""Method x category runs as a DVC experiment queue: `dvc exp run --queue -S ...` + `dvc queue start --jobs 2`.

A temporary repository (git init + dvc init) holds this project's real `evaluate` stage (taken from
dvc.yaml), its notebook pipeline/evaluate.py, the package sources it depends on, and a tiny generated
dataset of two categories at 32 px.  Two experiments, one per category, are queued and run by two
workers; each must succeed with its own metrics.  No scheduler of our own is involved.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vadlab.data import generate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CATEGORIES = ("brick", "grass")
TIMEOUT_S = 150


def _dvc(repo: Path, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def repo(tmp_path):
    """A git + DVC repository with the project's evaluate stage and a tiny two-category dataset."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src" / "vadlab", repo / "src" / "vadlab",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / "pipeline").mkdir()
    shutil.copy(ROOT / "pipeline" / "evaluate.py", repo / "pipeline" / "evaluate.py")
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(data={"name": "tiny", "root": "inputs/tiny", "categories": list(CATEGORIES)}, run_methods=["padim"],
                  unified_methods=[], jobs=1)
    if "n_seeds" in params:
        params["n_seeds"] = 1
    params["methods"] = {"padim": {"image_size": 32, "preset": "paper", "set": {"n_features": 16}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(repo / "inputs" / "tiny", seed=0, categories=list(CATEGORIES), n_train=8, n_test=6, size=32)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")  # the project's own: results/ is ignored but its metrics
    git = ["git", "-c", "user.email=test@vadlab", "-c", "user.name=vadlab-test", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tiny project"], cwd=repo, check=True)
    yield repo
    _dvc(repo, "queue", "kill", *CATEGORIES, check=False)  # no-op when finished; frees stuck tasks
    _dvc(repo, "queue", "stop", "--kill", check=False)  # and any worker still alive


def _experiments(repo: Path) -> dict[str, dict]:
    """Experiment name -> {"params": params.yaml values, "metrics": metrics of padim} from `dvc exp show`."""
    shown = json.loads(_dvc(repo, "exp", "show", "--json").stdout)
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                metrics = data["metrics"].get("results/tiny/metrics/padim.json", {}).get("data", {})
                out[rev["name"]] = {"params": data["params"]["params.yaml"]["data"], "metrics": metrics}
    return out


def test_two_workers_run_the_queued_category_experiments(repo):
    for category in CATEGORIES:
        _dvc(repo, "exp", "run", "--queue", "-n", category, "-S", f"data.categories=[{category}]")
    start = time.monotonic()
    _dvc(repo, "queue", "start", "--jobs", "2")
    while True:
        status = _dvc(repo, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        if time.monotonic() - start > TIMEOUT_S:
            pytest.fail(f"the queue did not finish within {TIMEOUT_S} s:\n{status}")
        time.sleep(2)
    assert status.count("Success") == 2, status
    experiments = _experiments(repo)
    assert set(experiments) == set(CATEGORIES)
    for category, other in (CATEGORIES, CATEGORIES[::-1]):
        exp = experiments[category]
        assert exp["params"]["data"]["categories"] == [category]
        assert category in exp["metrics"] and other not in exp["metrics"]  # its own category only
        assert 0.0 <= exp["metrics"][category]["image_auroc"] <= 1.0
    assert experiments["brick"]["metrics"]["brick"] != experiments["grass"]["metrics"]["grass"]
    assert not (repo / "results").exists()  # queued runs happen outside the workspace

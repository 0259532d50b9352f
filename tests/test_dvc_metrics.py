"""DVC as its users use it: `dvc metrics show/diff`, `dvc exp run` + `dvc exp show`, `dvc plots show`.

A temporary copy of this repository's pipeline — its real `.gitignore`, `.dvc/config` and plot templates,
the `evaluate` and `curves` stages and the `plots:` section of dvc.yaml — runs PaDiM on a tiny generated
dataset. The metrics must be readable by every DVC command (before, the metric files were git-ignored and
uncached, so `dvc exp show` printed `!` and `dvc metrics diff` `-`), a rerun of an unchanged run must give
an empty `dvc metrics diff` (no timings in the metric files), and `dvc plots show` must render the
curves on a page that loads nothing from the network.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vadlab.data import generate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CATEGORIES = ("brick", "grass")
METRIC_FILE = "results/tiny/metrics/padim.json"
GIT = ["git", "-c", "user.email=test@vadlab", "-c", "user.name=vadlab-test", "-c", "commit.gpgsign=false"]


def _run(repo: Path, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    shutil.copytree(ROOT / "src" / "vadlab", repo / "src" / "vadlab",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pipeline/evaluate.py", "pipeline/unified.py", "pipeline/curves.py", "pipeline/dvc_plots/offline.html",
                 ".gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {k: dvc_yaml["stages"][k] for k in ("evaluate", "unified", "curves")}
    stages["curves"]["deps"].remove("results/elpv")  # the real cells are not part of this tiny pipeline
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "plots": dvc_yaml["plots"]}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(data={"name": "tiny", "root": "inputs/tiny", "categories": list(CATEGORIES)}, elpv=None,
                  run_methods=["padim", "ae_ssim"], unified_methods=["padim"], jobs=1, n_seeds=1,
                  methods={"padim": {"image_size": 32, "preset": "paper", "set": {"n_features": 16, "ridge": 0.01}},
                           # a trained method, for the training curves: a few epochs of a small autoencoder
                           "ae_ssim": {"image_size": 32, "preset": "paper",
                                       "set": {"image_size": 32, "epochs": 3, "latent_dim": 16}}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(repo / "inputs" / "tiny", seed=0, categories=list(CATEGORIES), n_train=8, n_test=8, size=32)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _run(repo, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    _run(repo, "dvc", "repro", "-q")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "tiny pipeline, run once"], cwd=repo, check=True)
    return repo


def test_metric_files_are_tracked_by_git_and_shown(repo):
    tracked = _run(repo, "git", "ls-files", "results").split()
    assert tracked == ["results/tiny/metrics/ae_ssim.json", METRIC_FILE,  # not the predictions, maps, curves
                       "results/tiny/metrics/unified-padim.json"]
    shown = json.loads(_run(repo, "dvc", "metrics", "show", "--json"))
    values = shown[""]["data"][METRIC_FILE]["data"]
    for category in CATEGORIES:
        assert 0.0 <= values[category]["image_auroc"] <= 1.0
        assert not any("seconds" in k or "memory" in k for k in values[category])  # costs live elsewhere
    assert (repo / "results" / "tiny" / "padim" / "costs.json").is_file()


def test_unchanged_rerun_gives_an_empty_metrics_diff(repo):
    _run(repo, "dvc", "repro", "-q", "-f", "evaluate@padim")
    assert json.loads(_run(repo, "dvc", "metrics", "diff", "--json")) == {}


def test_experiments_show_their_own_metrics(repo):
    for name, ridge in (("ridge-small", "0.001"), ("ridge-large", "10.0")):
        _run(repo, "dvc", "exp", "run", "-q", "-n", name, "-S", f"methods.padim.set.ridge={ridge}")
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                experiments[rev["name"]] = (data["params"]["params.yaml"]["data"]["methods"]["padim"]["set"]["ridge"],
                                            data["metrics"][METRIC_FILE]["data"])
    assert set(experiments) == {"ridge-small", "ridge-large"}
    assert experiments["ridge-small"][0] == 0.001 and experiments["ridge-large"][0] == 10.0
    small, large = experiments["ridge-small"][1], experiments["ridge-large"][1]
    for category in CATEGORIES:
        assert 0.0 <= small[category]["image_auroc"] <= 1.0 and 0.0 <= large[category]["image_auroc"] <= 1.0
    assert small != large  # a thousandfold ridge changes the Mahalanobis maps
    # the workspace holds the last experiment: `dvc metrics diff` compares it with the commit, in numbers
    diff = json.loads(_run(repo, "dvc", "metrics", "diff", "--all", "--json"))[METRIC_FILE]
    entry = diff[f"{CATEGORIES[0]}.pixel_auroc"]
    assert isinstance(entry["old"], float) and isinstance(entry["new"], float)


def test_plots_render_offline_with_every_curve(repo):
    out = repo / "plots-page"
    _run(repo, "dvc", "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=\"http" not in page  # nothing loaded from a network
    assert "vega-embed" in page or "vegaEmbed" in page
    for kind in ("image_roc", "image_pr", "pixel_pro", "scores", "training"):
        assert f"results/plots/tiny/{kind}.csv" in page
    plots = repo / "results" / "plots" / "tiny"
    roc = (plots / "image_roc.csv").read_text().splitlines()
    assert roc[0] == "run,fpr,tpr" and len(roc) == 1 + 3 * 101 and roc[1].startswith("padim,0.0,")
    training = (plots / "training.csv").read_text().splitlines()
    assert training[0] == "run,category,step,loss"
    assert {line.split(",")[:3][0] for line in training[1:]} == {"ae_ssim"}  # PaDiM does not train
    assert sorted(line.split(",")[1] + line.split(",")[2] for line in training[1:]) == \
        sorted(f"{c}{k}" for c in CATEGORIES for k in (1, 2, 3))  # 3 epochs per category

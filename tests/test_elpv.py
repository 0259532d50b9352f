"""Image-level-only datasets (no ground_truth/) and the ELPV solar cells in MVTec layout."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest

from vadlab.cli import main
from vadlab.data import MVTecDataset, generate
from vadlab.data.elpv import elpv_cells, elpv_split, write_elpv

PIXEL = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1max")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=1, categories=["brick"], n_train=12, n_test=8, size=64)
    return root


def test_image_level_only_folder_gives_image_metrics_and_null_pixel_metrics(synth, tmp_path, capsys):
    root = tmp_path / "labels_only"
    shutil.copytree(synth, root)
    shutil.rmtree(root / "brick" / "ground_truth")  # good/bad labels only
    test = MVTecDataset(root, "brick", "test", 64)
    assert sum(test.labels) == 4 and test.pixel_labels_missing
    assert not any(item["has_mask"] for item in test if item["label"] == 1)
    out = tmp_path / "run"
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--image-size", "64",
                 "--out", str(out), "--set", "n_features=32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["image_ap"] <= 1.0
    assert all(metrics[k] is None for k in PIXEL)
    assert "image-level labels only" in metrics["pixel_metrics_missing"]
    assert "4 of 4 defective" in metrics["pixel_metrics_missing"]
    printed = capsys.readouterr().out
    assert "—" in printed and "nan" not in printed
    # the same images with their masks: pixel metrics are numbers again
    shutil.rmtree(out)
    assert main(["evaluate", "padim", "--data", str(synth), "--category", "brick", "--image-size", "64",
                 "--out", str(out), "--set", "n_features=32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(metrics[k], float) for k in PIXEL) and "pixel_metrics_missing" not in metrics


def test_half_masked_defect_folder_is_an_error_naming_the_files(synth, tmp_path, capsys):
    root = tmp_path / "half"
    shutil.copytree(synth, root)
    defect_dir = next(d for d in sorted((root / "brick" / "test").iterdir()) if d.name != "good")
    image = sorted(defect_dir.glob("*.png"))[0]
    assert (root / "brick" / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png").is_file()
    unmasked = [defect_dir / f"extra{k}.png" for k in range(2)]  # same folder, no masks
    for extra in unmasked:
        shutil.copyfile(image, extra)
    with pytest.raises(FileNotFoundError) as err:
        MVTecDataset(root, "brick", "test", 64)
    message = str(err.value)
    assert "extra0.png" in message and "extra1.png" in message and image.name not in message, message
    assert f"2 of {len(list(defect_dir.glob('*.png')))} defective" in message and "image labels only" in message
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--image-size", "64"]) == 2
    assert "extra0.png" in capsys.readouterr().err


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_elpv_counts_split_and_cap():
    cells = elpv_cells()
    assert len(cells) == 2624
    for category, n0, n1 in (("mono", 588, 313), ("poly", 920, 402)):
        parts = elpv_split(cells, category, seed=0)
        assert len(parts["train"]) + len(parts["test_good"]) == n0
        assert len(parts["train"]) == round(0.8 * n0) and len(parts["test_defective"]) == n1
        assert {c.probability for c in parts["graded"]} == {1 / 3, 2 / 3}
        assert all(c.type == category for p in parts.values() for c in p)
        train = {c.path.name for c in parts["train"]}
        assert not train & {c.path.name for c in parts["test_good"]}
        other = {c.path.name for c in elpv_split(cells, category, seed=1)["train"]}
        assert other != train  # the seed moves the split
        capped = elpv_split(cells, category, seed=0, max_train=200)
        assert len(capped["train"]) == 200 and {c.path.name for c in capped["train"]} <= train
        assert capped["test_good"] == parts["test_good"]  # the cap never touches the test set


def test_vadlab_data_elpv_is_deterministic_byte_for_byte(tmp_path):
    assert main(["data", "elpv", "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    write_elpv(tmp_path / "b", seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    counts = {k: sum(1 for name in a if name.startswith(k) and name.endswith(".png"))
              for k in ("mono/train/good/", "mono/test/good/", "mono/test/defective/", "mono/graded/",
                        "poly/train/good/", "poly/test/good/", "poly/test/defective/", "poly/graded/")}
    assert counts == {"mono/train/good/": 470, "mono/test/good/": 118, "mono/test/defective/": 313,
                      "mono/graded/": 173, "poly/train/good/": 736, "poly/test/good/": 184,
                      "poly/test/defective/": 402, "poly/graded/": 228}
    assert not any("ground_truth" in name for name in a)
    with open(tmp_path / "a" / "mono" / "graded" / "probabilities.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 173 and {round(3 * float(r["probability"])) for r in rows} == {1, 2}
    assert "CC BY-NC-SA 4.0" in a["README.txt"].decode() and "Deitsch" in a["README.txt"].decode()
    write_elpv(tmp_path / "c", seed=4)
    assert _files(tmp_path / "c") != a
    test = MVTecDataset(tmp_path / "a", "poly", "test", 32)
    assert sum(test.labels) == 402 and test.pixel_labels_missing == ["defective"]


def test_missing_elpv_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install elpv-dataset"):
        write_elpv(tmp_path / "x")
    assert main(["data", "elpv", "--out", str(tmp_path / "y")]) == 2
    assert "pip install elpv-dataset" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_graded_cells_are_scored_with_a_spearman_correlation(tmp_path):
    from vadlab.evaluate_graded import run_graded

    root = write_elpv(tmp_path / "elpv", seed=0, limit=6, categories=("mono",))
    out = tmp_path / "run"
    m = run_graded("padim", root, "mono", 32, {"n_features": 16}, out, seed=0)
    assert all(m[k] is None for k in PIXEL) and 0.0 <= m["image_auroc"] <= 1.0
    with open(out / "graded.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 == m["n_graded"]
    probs = np.array([float(r["probability"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    from scipy.stats import spearmanr

    assert m["graded_spearman"] == pytest.approx(spearmanr(probs, scores).statistic)
    assert set(k for k in m if k.startswith("mean_score_p")) == {"mean_score_p0", "mean_score_p1",
                                                                   "mean_score_p2", "mean_score_p3"}

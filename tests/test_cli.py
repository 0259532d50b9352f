"""The `vadlab` command end to end on a small folder in MVTec AD layout."""

import csv
import json

import pytest

from vadlab.cli import main
from vadlab.data import generate
from vadlab.methods.base import apply_overrides
from vadlab.methods.padim import PadimConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    generate(root, seed=1, categories=["brick"], n_train=12, n_test=8, size=64)
    return root


def test_evaluate_writes_metrics_and_overlays(root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--image-size", "64",
                 "--out", str(out), "--set", "n_features=32", "--set", "sigma=2"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max",
                "fit_seconds", "predict_seconds_per_image", "peak_memory_mb"):
        assert key in metrics
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["config"]["n_features"] == 32 and metrics["config"]["sigma"] == 2.0
    assert list((out / "overlays").glob("*.png"))
    assert (out / "predictions.npz").is_file()
    assert "image_auroc" in capsys.readouterr().out


def test_fit_then_predict_folder(root, tmp_path):
    model = tmp_path / "padim.pt"
    assert main(["fit", "padim", "--data", str(root), "--category", "brick", "--image-size", "64",
                 "--out", str(model), "--set", "n_features=16", "--holdout", "0.25"]) == 0
    info = json.loads(model.with_suffix(".json").read_text())
    assert info["n_holdout"] == 3 and info["threshold"] > 0
    out = tmp_path / "scores"
    assert main(["predict", str(model), str(root / "brick" / "test"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 8 and all(r["anomalous"] in ("0", "1") for r in rows)
    assert len(list((out / "maps").glob("*.npy"))) == 8


def test_clear_errors(root, tmp_path, capsys):
    assert main(["evaluate", "padim", "--data", str(tmp_path / "nope"), "--category", "brick"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", "padim", "--data", str(root), "--category", "carpet"]) == 2
    assert "brick" in capsys.readouterr().err  # lists the categories that exist
    assert main(["evaluate", "nomethod", "--data", str(root), "--category", "brick"]) == 2
    assert "padim" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.pt"), str(root), "--out", str(tmp_path)]) == 2


def test_set_values_are_typed():
    cfg = apply_overrides(PadimConfig(), {"n_features": "7", "ridge": "0.5", "layers": "blocks.1,blocks.2"})
    assert cfg.n_features == 7 and cfg.ridge == 0.5 and cfg.layers == ("blocks.1", "blocks.2")
    with pytest.raises(ValueError, match="n_features='seven'"):
        apply_overrides(PadimConfig(), {"n_features": "seven"})


def test_every_method_is_registered_with_a_cpu_preset():
    """All eleven methods load by name, and each documented small-CPU preset builds a model."""
    from vadlab.methods import available_methods, get_method, preset_overrides

    names = available_methods()
    assert set(names) == {"padim", "semi_orthogonal", "patchcore", "cflow", "pyramidflow", "ae_ssim", "riad",
                          "favae", "mkd", "dmad", "diad"}
    for name in names:
        overrides = preset_overrides(name, "cpu")
        model = get_method(name)(**overrides)
        assert model.name == name
        for key, value in overrides.items():
            assert getattr(model.config, key) == value
    with pytest.raises(ValueError, match="preset"):
        preset_overrides("padim", "huge")

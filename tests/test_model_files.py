"""Model files: crafted pickles refused unrun, everything prediction needs saved inside, CPU fallback."""

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch

from vadlab.cli import main
from vadlab.data.mvtec import load_image
from vadlab.methods import AnomalyMethod

PADIM = ["--set", "n_features=16", "--image-size", "64"]


@pytest.fixture(scope="module")
def fitted(root, tmp_path_factory):
    """A PaDiM model fitted by `vadlab fit` at 64 px with a held-out threshold."""
    model = tmp_path_factory.mktemp("model") / "padim.pt"
    assert main(["fit", "padim", "--data", str(root), "--category", "brick", "--out", str(model),
                 "--holdout", "0.25", *PADIM]) == 0
    return model


class _WritesAFile:
    """Unpickling this runs ``open(path, 'w').write(...)``: what a malicious model file would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_refused_and_never_run(root, tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"method": "padim", "config": {}, "state": {}, "payload": _WritesAFile(marker)}, evil)
    with pytest.raises(ValueError, match="refuses to load"):
        AnomalyMethod.load(evil)
    assert not marker.exists()
    assert main(["predict", str(evil), str(root / "brick" / "test"), "--out", str(tmp_path / "scores")]) == 2
    err = capsys.readouterr().err
    assert "evil.pt" in err and "refuses" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "scores" / "scores.csv").exists()


def test_model_file_holds_size_threshold_config_and_version(fitted):
    import vadlab

    model = AnomalyMethod.load(fitted)
    meta = model.meta
    assert meta["image_size"] == 64 and meta["category"] == "brick" and meta["n_holdout"] == 3
    assert meta["threshold"] > 0 and meta["vadlab_version"] == vadlab.__version__
    assert meta["config"]["n_features"] == 16
    assert json.loads(fitted.with_suffix(".json").read_text())["threshold"] == meta["threshold"]


def test_predict_uses_the_saved_size_and_threshold_not_the_json(root, fitted, tmp_path, capsys):
    """A stale .json beside the model (a kill between the two writes) must not change the result."""
    model = AnomalyMethod.load(fitted)
    stale = tmp_path / "padim.pt"
    stale.write_bytes(fitted.read_bytes())
    stale.with_suffix(".json").write_text(json.dumps({"image_size": 256, "threshold": 1e9}))
    out = tmp_path / "scores"
    assert main(["predict", str(stale), str(root / "brick" / "test"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    images = torch.stack([load_image(r["image"], 64) for r in rows])
    expected, _ = model.predict(images)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected.numpy(), rtol=1e-5)
    assert [r["anomalous"] for r in rows] == [str(int(s > model.meta["threshold"])) for s in expected.tolist()]
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == len(rows)
    from PIL import Image

    assert Image.open(heatmaps[0]).size[0] > 2 * 64  # image + overlay + colour bar, not a bare map

    capsys.readouterr()
    # PaDiM's Gaussians are per position: another size cannot work, and the error says which size can
    assert main(["predict", str(stale), str(root / "brick" / "test" / "good"), "--out", str(out),
                 "--image-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "differs from the 64 px" in err and "fitted at 64 px" in err
    assert not (out / "scores.csv").exists()  # the earlier call's results are not left looking current
    assert main(["predict", str(stale), str(root / "brick" / "test" / "good"), "--out", str(out),
                 "--no-heatmaps"]) == 0
    assert not (out / "heatmaps").exists()  # the earlier call's heatmaps are not mixed in
    assert len(list(csv.DictReader(open(out / "scores.csv")))) == 4


def test_evaluate_save_model_records_its_image_size(root, tmp_path):
    """`evaluate --save-model` at 64 px, then `predict` with no size given: the evaluate's scores."""
    run = tmp_path / "run"
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--out", str(run),
                 "--save-model", *PADIM]) == 0
    assert AnomalyMethod.load(run / "model.pt").meta["image_size"] == 64
    assert main(["predict", str(run / "model.pt"), str(root / "brick" / "test"), "--out", str(tmp_path / "p"),
                 "--no-heatmaps"]) == 0
    predicted = {r["image"]: float(r["score"]) for r in csv.DictReader(open(tmp_path / "p" / "scores.csv"))}
    saved = np.load(run / "predictions.npz")
    for path, s in zip(saved["paths"], saved["scores"]):
        assert predicted[str(path)] == pytest.approx(float(s), rel=1e-5)


def _rewrite(src, dst, change):
    blob = torch.load(src, weights_only=True)
    change(blob)
    torch.save(blob, dst)
    return dst


def test_old_model_without_metadata_still_loads_with_a_note(fitted, tmp_path, caplog):
    old = _rewrite(fitted, tmp_path / "old.pt", lambda b: b.pop("meta"))
    with caplog.at_level(logging.INFO, logger="vadlab"):
        model = AnomalyMethod.load(old)
    assert model.meta == {} and "no metadata" in caplog.text


def test_cuda_model_falls_back_to_cpu(root, fitted, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = _rewrite(fitted, tmp_path / "gpu.pt", lambda b: b["config"].update(device="cuda"))
    with caplog.at_level(logging.WARNING, logger="vadlab"):
        model = AnomalyMethod.load(gpu)
    assert model.device.type == "cpu" and "no CUDA" in caplog.text
    assert main(["predict", str(gpu), str(root / "brick" / "test" / "good"), "--out", str(tmp_path / "s"),
                 "--no-heatmaps"]) == 0
    assert "loading it on the CPU" in capsys.readouterr().err
    assert main(["test", str(gpu), "--data", str(root), "--device", "cpu"]) == 0
    assert "no CUDA" not in capsys.readouterr().err  # an explicit --device: no note


def test_test_verb_scores_a_saved_model_without_refitting(root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--out", str(run),
                 "--save-model", *PADIM]) == 0
    from vadlab.methods.padim import Padim

    def no_fit(self, loader):
        raise AssertionError("vadlab test must not fit")

    monkeypatch.setattr(Padim, "fit", no_fit)
    out = tmp_path / "tested"
    assert main(["test", str(run / "model.pt"), "--data", str(root), "--category", "brick", "--out", str(out)]) == 0
    first, again = json.loads((run / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1max", "pixel_f1max"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
    assert again["per_defect_image_auroc"] == pytest.approx(first["per_defect_image_auroc"], abs=1e-6)
    assert (out / "predictions.npz").is_file() and (out / "curves" / "image_roc.csv").is_file()
    assert os.path.isfile(out / "scores.csv")

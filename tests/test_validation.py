"""Bad input ends in one clear line and exit code 2 (Ctrl-C: 130), before any work is done."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vadlab import cli
from vadlab.cli import main
from vadlab.data import MVTecDataset, generate
from vadlab.data.mvtec import mask_to_array
from vadlab.methods.padim import Padim

FAST = ["--image-size", "64", "--set", "n_features=16"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a method is built (the error must come before any fitting)."""
    import vadlab.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the input error must be reported before any work")

    monkeypatch.setattr(vadlab.evaluate, "build_method", refuse)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("vadlab: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("setting, needle", [("ridge=0", "ridge=0.0"), ("ridge=-1", "ridge=-1.0"),
                                             ("ridge=nan", "finite"), ("ridge=inf", "finite"),
                                             ("batch_size=0", "batch_size=0"), ("n_features=0", "n_features=0")])
def test_hyperparameter_ranges_are_checked_when_the_config_is_built(root, capsys, setting, needle):
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", *FAST, "--set", setting]) == 2
    _one_line_error(capsys, needle)
    with pytest.raises(ValueError, match=needle.split("=")[0]):
        Padim(**{setting.split("=")[0]: float(setting.split("=")[1])})


def test_weights_that_are_not_a_weights_file(root, tmp_path, capsys):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--set", f"weights={text}"]) == 2
    _one_line_error(capsys, "not a weights file", str(text))
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick",
                 "--set", f"weights={tmp_path / 'missing.pth'}"]) == 2
    _one_line_error(capsys, "missing.pth", "no such file")


def test_offline_backbone_is_a_clear_error(root, tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--set", "backbone=resnet18",
                 "--set", "layers=layer1,layer2,layer3", *FAST]) == 2
    _one_line_error(capsys, "resnet18", "efficientnet_lite0")
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--set", "backbone=resnet9000"]) == 2
    _one_line_error(capsys, "resnet9000", "choose one of")


@pytest.mark.parametrize("size, needle", [("1", "too small"), ("7", "too small"), ("10000", "GiB")])
def test_image_size_bounds(root, capsys, no_work, size, needle):
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--image-size", size]) == 2
    _one_line_error(capsys, f"--image-size {size}", needle)


def test_image_size_must_be_a_multiple_where_the_method_needs_it(root, capsys, monkeypatch):
    """PyramidFlow's pyramid halves its stride-4 features twice: 40 px cannot work, said before fitting."""
    from vadlab.methods.pyramidflow import PyramidFlow

    def no_fit(self, loader):
        raise AssertionError("the size error must come before fitting")

    monkeypatch.setattr(PyramidFlow, "fit", no_fit)
    assert main(["evaluate", "pyramidflow", "--data", str(root), "--category", "brick", "--preset", "cpu",
                 "--image-size", "40"]) == 2
    _one_line_error(capsys, "(40, 40)", "multiple of")


def test_out_that_is_a_file_is_refused_before_any_work(root, tmp_path, capsys, no_work):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--out", str(afile)]) == 2
    _one_line_error(capsys, "afile", "is a file")
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--out", str(afile / "sub")]) == 2
    _one_line_error(capsys, "afile", "is a file")
    assert main(["fit", "padim", "--data", str(root), "--category", "brick", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder")


def test_read_only_out_is_refused_before_any_work(root, tmp_path, capsys, no_work, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
        except PermissionError:
            pass
        else:  # root ignores permission bits: make the folder refuse writes as a read-only mount does
            import tempfile
            from pathlib import Path

            from vadlab import fileio

            real = tempfile.TemporaryFile

            def refuse(*args, dir=None, **kwargs):
                if dir is not None and Path(dir) == locked:
                    raise PermissionError(13, "Permission denied")
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(fileio.tempfile, "TemporaryFile", refuse)
        assert main(["evaluate", "padim", "--data", str(root), "--category", "brick",
                     "--out", str(locked / "run")]) == 2
        _one_line_error(capsys, "locked")
    finally:
        locked.chmod(0o700)


def test_repeated_category_is_counted_once(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "padim", "--data", str(root), "--category", "brick", "--category", "brick",
                 "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "repeats" in captured.err
    assert "mean" not in captured.out  # one category: no mean row of two copies
    assert (out / "metrics.json").is_file() and not (out / "brick").exists()


def test_empty_and_missing_dataset_roots(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "padim", "--data", str(empty)]) == 2
    _one_line_error(capsys, "no categories", f"vadlab data synth --out {empty}")
    assert main(["evaluate", "padim", "--data", str(tmp_path / "nope"), "--category", "brick"]) == 2
    _one_line_error(capsys, f"vadlab data synth --out {tmp_path / 'nope'}")


@pytest.mark.parametrize("seed", [str(2**70), "-1", "x"])
def test_seed_out_of_range_is_a_usage_error(root, capsys, seed):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "padim", "--data", str(root), "--seed", seed])
    assert stop.value.code == 2 and "--seed" in capsys.readouterr().err


def test_batch_size_zero_is_a_usage_error(root, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "padim", "--data", str(root), "--batch-size", "0"])
    assert stop.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_methods", interrupted)
    assert main(["methods"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_version(capsys):
    import vadlab

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"vadlab {vadlab.__version__}"


def test_quiet_and_verbose(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--categories", "brick", "--n-train", "2",
                 "--n-test", "2", "--size", "32"]) == 0
    assert "wrote the generated dataset" in capsys.readouterr().out
    assert main(["-q", "data", "synth", "--out", str(tmp_path / "b"), "--categories", "brick", "--n-train", "2",
                 "--n-test", "2", "--size", "32"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert main(["data", "synth", "-q", "--out", str(tmp_path / "c"), "--categories", "brick", "--n-train", "2",
                 "--n-test", "2", "--size", "32"]) == 0
    assert "wrote" not in capsys.readouterr().out


def test_synth_overwrite_removes_only_folders_synth_made(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "brick").mkdir(parents=True)
    (out / "brick" / "thesis.txt").write_text("precious")
    small = ["--categories", "brick", "--n-train", "2", "--n-test", "2", "--size", "32"]
    assert main(["data", "synth", "--out", str(out), "--overwrite", *small]) == 2
    _one_line_error(capsys, str(out / "brick"), "not written by `vadlab data synth`")
    assert (out / "brick" / "thesis.txt").read_text() == "precious"
    made = tmp_path / "made"
    assert main(["data", "synth", "--out", str(made), *small]) == 0
    assert main(["data", "synth", "--out", str(made), "--overwrite", "--seed", "3", *small]) == 0
    assert json.loads((made / "dataset.json").read_text())["seed"] == 3


def test_config_and_run_read_a_params_block(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("methods:\n  padim_small:\n    method: padim\n    image_size: 64\n    set:\n"
                      "      n_features: 12\n      sigma: 2\n")
    out = tmp_path / "run"
    assert main(["evaluate", "--config", str(params), "--run", "padim_small", "--data", str(root),
                 "--category", "brick", "--out", str(out), "--set", "sigma=3", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "padim" and metrics["image_size"] == 64
    assert metrics["config"]["n_features"] == 12 and metrics["config"]["sigma"] == 3.0  # --set wins
    assert metrics["config"]["device"] == "cpu"
    assert main(["evaluate", "--config", str(params), "--run", "nope", "--data", str(root)]) == 2


# -- masks ---------------------------------------------------------------------------------------------


def _as_jpeg(mask: np.ndarray) -> Image.Image:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="JPEG", quality=75)
    buf.seek(0)
    return Image.open(buf)


def test_masks_are_binarised_at_half_their_maximum(caplog):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:28, 30:38] = 255
    with caplog.at_level(logging.WARNING, logger="vadlab"):
        jpeg = mask_to_array(_as_jpeg(mask), "m_jpeg.jpg")
    assert abs(int(jpeg.sum()) - 64) <= 8  # "> 0" would grow it to every JPEG ringing pixel
    assert "m_jpeg.jpg" in caplog.text and "not binary" in caplog.text
    background = np.full((64, 64), 3, np.uint8)
    background[20:28, 30:38] = 255
    assert int(mask_to_array(Image.fromarray(background), "bg3.png").sum()) == 64
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vadlab"):
        exact = mask_to_array(Image.fromarray(mask // 255), "index.png")  # BTAD/VisA: 0 and a class index
    assert int(exact.sum()) == 64 and "index.png" not in caplog.text


def test_all_zero_mask_of_a_defect_image_warns_naming_it(tmp_path, caplog):
    root = generate(tmp_path / "d", seed=0, categories=["brick"], n_train=2, n_test=4, size=32)
    masks = sorted((root / "brick" / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks[0])
    test = MVTecDataset(root, "brick", "test", 32)
    with caplog.at_level(logging.WARNING, logger="vadlab"):
        items = [test[i] for i in range(len(test))]
    assert str(masks[0]) in caplog.text and "all zero" in caplog.text
    assert sum(int(item["mask"].sum() == 0 and item["label"] == 1) for item in items) == 1


# -- archives ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_tar_links_and_devices_are_refused_with_one_line(tmp_path, capsys, kind):
    archive = tmp_path / "mvtec_anomaly_detection.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"img"
        info = tarfile.TarInfo("bottle/train/good/000.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        odd = tarfile.TarInfo("bottle/train/good/001.png")
        odd.type = kind
        odd.linkname = "/etc/passwd" if kind != tarfile.LNKTYPE else "bottle/train/good/000.png"
        tf.addfile(odd)
    assert main(["data", "download", "mvtec", "--archive", str(archive), "--sha256", "",
                 "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "001.png", "links or device files")
    assert not (tmp_path / "out").exists()

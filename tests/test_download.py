"""Dataset downloads: archive checks, offline errors, and the MVTec / BTAD / VisA conversions on tiny fakes."""

import csv
import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vadlab.cli import main
from vadlab.data import MVTecDataset, generate
from vadlab.data.download import (SOURCES, ChecksumError, DownloadError, check_dataset, download, sha256sum)


def _img(path: Path, value: int, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _mask(path: Path, index: int = 1, size=(24, 20)) -> None:
    """A VisA/BTAD-style mask: a small non-zero value (class index) on a block, zero elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[5:10, 6:12] = index
    Image.fromarray(m).save(path)


def _tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(folder)), recursive=False)
    return archive


def _fake_visa(root: Path) -> Path:
    """VisA's raw layout: <obj>/Data/Images/{Normal,Anomaly}, <obj>/Data/Masks/Anomaly, split_csv/1cls.csv."""
    rows = [("object", "split", "label", "image", "mask")]
    for obj in ("candle", "pcb1", "fryum"):
        for i in range(5):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel, 100 + i)
            rows.append((obj, "train" if i < 3 else "test", "normal", rel, ""))
        for i in range(2):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, 200)
            _mask(root / mrel, index=i + 1)
            rows.append((obj, "test", "anomaly", rel, mrel))
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def test_visa_archive_converts_to_mvtec_layout(tmp_path):
    archive = _tar(_fake_visa(tmp_path / "raw"), tmp_path / "VisA_20220922.tar")
    out = download("visa", tmp_path / "visa", archive=archive, sha256=sha256sum(archive),
                   categories=("candle", "pcb1"))
    assert sorted(p.name for p in out.iterdir()) == ["candle", "pcb1"]  # fryum not asked for
    for obj in ("candle", "pcb1"):
        train, test = MVTecDataset(out, obj, "train", 16), MVTecDataset(out, obj, "test", 16)
        assert len(train) == 3 and test.labels == [1, 1, 0, 0]  # test/bad sorts before test/good
        assert test.defects == ["bad", "bad", "good", "good"]
        mask = np.asarray(Image.open(out / obj / "ground_truth" / "bad" / "000_mask.png"))
        assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 30  # class index 1 -> 255
        item = test[0]
        assert item["mask"].sum() > 0 and item["label"] == 1
    assert not list(tmp_path.glob(".visa.*"))  # scratch folders removed


def test_checksum_mismatch_leaves_nothing(tmp_path):
    archive = _tar(_fake_visa(tmp_path / "raw"), tmp_path / "v.tar")
    with pytest.raises(ChecksumError, match="expected 0000"):
        download("visa", tmp_path / "visa", archive=archive, sha256="0000" + "0" * 60)
    assert not (tmp_path / "visa").exists()
    assert SOURCES["visa"].sha256 == "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"


def test_download_from_url_is_cached(tmp_path):
    archive = _tar(_fake_visa(tmp_path / "raw"), tmp_path / "served.tar")
    cache = tmp_path / "cache"
    download("visa", tmp_path / "a", url=archive.as_uri(), sha256=sha256sum(archive), cache=cache,
             categories=("candle",))
    assert sha256sum(cache / "VisA_20220922.tar") == sha256sum(archive)
    archive.unlink()  # the second call must not need the URL any more
    with pytest.warns(UserWarning, match="not verified"):  # sha256="" skips the check, loudly
        download("visa", tmp_path / "b", url="http://127.0.0.1:9/gone.tar", sha256="", cache=cache,
                 categories=("candle",))
    assert len(MVTecDataset(tmp_path / "b", "candle", "train")) == 3


def test_offline_error_names_url_and_where_to_put_the_archive(tmp_path, capsys):
    url = "http://127.0.0.1:9/mvtec_anomaly_detection.tar.xz"  # nothing listens on port 9: refused at once
    with pytest.raises(DownloadError) as err:
        download("mvtec", tmp_path / "mvtec", url=url, cache=tmp_path / "cache")
    message = str(err.value)
    assert url in message and str(tmp_path / "cache" / "mvtec_anomaly_detection.tar.xz") in message
    assert "--archive" in message
    assert not (tmp_path / "cache" / "mvtec_anomaly_detection.tar.xz.part").exists()
    code = main(["data", "download", "btad", "--out", str(tmp_path / "btad"), "--url", "http://127.0.0.1:9/b.zip",
                 "--cache", str(tmp_path / "cache")])
    assert code == 2 and "http://127.0.0.1:9/b.zip" in capsys.readouterr().err


def test_btad_zip_converts(tmp_path):
    raw = tmp_path / "raw" / "BTech_Dataset_transformed"
    for c in ("01", "02", "03"):
        for i in range(3):
            _img(raw / c / "train" / "ok" / f"{i:03d}.bmp", 90 + i)
        _img(raw / c / "test" / "ok" / "000.bmp", 95)
        _img(raw / c / "test" / "ko" / "007.bmp", 240)
        _mask(raw / c / "ground_truth" / "ko" / "007.png", index=255)
    archive = tmp_path / "btad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "raw").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "raw"))
    out = download("btad", tmp_path / "btad", archive=archive, sha256=sha256sum(archive))
    for c in ("01", "02", "03"):
        test = MVTecDataset(out, c, "test", 16)
        assert len(MVTecDataset(out, c, "train", 16)) == 3
        assert test.defects == ["good", "ko"] and test.labels == [0, 1]
        assert (out / c / "ground_truth" / "ko" / "007_mask.png").is_file()


def test_mvtec_tar_xz_and_cli(tmp_path, capsys):
    gen = generate(tmp_path / "gen", seed=0, categories=["brick"], n_train=4, n_test=4, size=32)
    raw = tmp_path / "raw"
    shutil.copytree(gen / "brick", raw / "bottle")
    (raw / "license.txt").write_text("CC BY-NC-SA 4.0")
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        for p in sorted(raw.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(raw)), recursive=False)
    out = tmp_path / "data" / "mvtec"
    assert main(["data", "download", "mvtec", "--out", str(out), "--archive", str(archive),
                 "--sha256", hashlib.sha256(archive.read_bytes()).hexdigest(), "--categories", "bottle"]) == 0
    assert "MVTec layout" in capsys.readouterr().out
    assert len(MVTecDataset(out, "bottle", "test")) == 4
    with pytest.raises(FileExistsError, match="not empty"):
        download("mvtec", out, archive=archive, categories=("bottle",))


def test_archive_with_escaping_paths_is_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"x"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="outside the target folder"):
        download("visa", tmp_path / "visa", archive=archive, sha256=sha256sum(archive))
    assert not (tmp_path / "escaped.txt").exists()


def test_check_dataset_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vadlab data download mvtec --out"):
        check_dataset(tmp_path / "mvtec", ["bottle"], "mvtec")
    (tmp_path / "mvtec" / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images.*vadlab data download mvtec"):
        check_dataset(tmp_path / "mvtec", ["bottle"], "mvtec")

"""Tests for vadlab.data: MVTec-layout loader, synthetic generator, digit tasks."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from vadlab.data import (
    DEFECT_KINDS,
    SYNTH_CATEGORIES,
    DigitsOneClass,
    MNISTOneClass,
    MVTecDataset,
    generate,
    list_categories,
    make_loader,
    render_sample,
)
from vadlab.data.synthetic import OBJECT_CATEGORIES, TEXTURE_CATEGORIES

TINY = dict(n_train=4, n_test=10, size=64)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "ds", seed=0, **TINY)


# ----------------------------------------------------------------------------- generator


def test_categories_and_kinds():
    assert set(TEXTURE_CATEGORIES) | set(OBJECT_CATEGORIES) == set(SYNTH_CATEGORIES)
    assert len(TEXTURE_CATEGORIES) >= 3 and len(OBJECT_CATEGORIES) >= 3
    for cat in SYNTH_CATEGORIES:
        assert len(set(DEFECT_KINDS[cat])) >= 4, cat
        assert "good" not in DEFECT_KINDS[cat]


def test_layout_and_counts(tiny_root):
    assert list_categories(tiny_root) == sorted(SYNTH_CATEGORIES)
    meta = json.loads((tiny_root / "dataset.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == 64
    for cat in SYNTH_CATEGORIES:
        d = tiny_root / cat
        assert len(list((d / "train" / "good").glob("*.png"))) == TINY["n_train"]
        assert len(list((d / "test" / "good").glob("*.png"))) == TINY["n_test"] // 2
        kinds = sorted(p.name for p in (d / "test").iterdir() if p.name != "good")
        assert kinds == sorted(DEFECT_KINDS[cat])  # 5 defective images -> one per kind
        n_def = 0
        for kind in kinds:
            for img in (d / "test" / kind).glob("*.png"):
                mask = d / "ground_truth" / kind / f"{img.stem}_mask.png"
                assert mask.is_file(), mask
                m = np.asarray(Image.open(mask))
                assert m.shape == (64, 64) and set(np.unique(m)) == {0, 255}
                n_def += 1
        assert n_def == TINY["n_test"] - TINY["n_test"] // 2
        assert meta["categories"][cat]["defects"] == list(DEFECT_KINDS[cat])
        with Image.open(d / "train" / "good" / "000.png") as im:
            assert im.mode == "RGB" and im.size == (64, 64)


def test_generation_is_deterministic(tiny_root, tmp_path):
    cats = ["brick", "chip"]
    a = generate(tmp_path / "a", seed=0, categories=cats, **TINY)
    b = generate(tmp_path / "b", seed=0, categories=cats, **TINY)
    c = generate(tmp_path / "c", seed=1, categories=cats, **TINY)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    # same files as the all-category run: each file depends on (seed, category, split, index) only
    full = _digest(tiny_root)
    assert all(full[k] == v for k, v in da.items() if k != "dataset.json")
    differ = [k for k in da if k.endswith(".png") and da[k] != dc[k]]
    assert len(differ) > 0.9 * sum(k.endswith(".png") for k in da)


def test_generate_refuses_to_clobber(tmp_path):
    kw = dict(categories=["grass"], n_train=2, n_test=2, size=32)
    root = generate(tmp_path, seed=0, **kw)
    assert generate(tmp_path, seed=0, **kw) == root  # same settings: found, nothing redone
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate(tmp_path, seed=5, **kw)
    generate(tmp_path, seed=5, overwrite=True, **kw)
    assert json.loads((tmp_path / "dataset.json").read_text())["seed"] == 5


@pytest.mark.parametrize("category", SYNTH_CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category, tiny_root):
    for kind in DEFECT_KINDS[category]:
        clean, defective, mask = render_sample(category, kind, seed=0, index=0, size=64)
        assert clean.dtype == np.uint8 and clean.shape == (64, 64, 3) and mask.dtype == bool
        changed = (clean != defective).any(-1)
        assert mask.sum() >= 4, (category, kind)
        assert not (changed & ~mask).any(), "a changed pixel lies outside the mask"
        assert not (mask & ~changed).any(), "the mask holds an unchanged pixel"
        assert mask.mean() < 0.25, (category, kind)
        # the written files are these arrays
        on_disk = np.asarray(Image.open(tiny_root / category / "test" / kind / "000.png"))
        np.testing.assert_array_equal(on_disk, defective)
        m = np.asarray(Image.open(tiny_root / category / "ground_truth" / kind / "000_mask.png")) > 0
        np.testing.assert_array_equal(m, mask)
    clean, same, empty = render_sample(category, None, split="train", index=3, size=64)
    np.testing.assert_array_equal(clean, same)
    assert not empty.any()


def test_normal_images_vary():
    for cat in ("brick", "screw"):
        a = render_sample(cat, None, split="train", index=0, size=64)[0].astype(float)
        b = render_sample(cat, None, split="train", index=1, size=64)[0].astype(float)
        assert np.abs(a - b).mean() > 5


def test_render_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic category"):
        render_sample("banana")
    with pytest.raises(ValueError, match="not defined"):
        render_sample("brick", "bent")
    with pytest.raises(ValueError, match="defect-free"):
        render_sample("brick", "scratch", split="train")


def test_pixel_zscore_baseline_is_not_enough():
    """Per-pixel mean/std against the training images must not already solve the dataset."""
    n_train, n_test, size = 40, 40, 256
    aucs = {}
    for cat in SYNTH_CATEGORIES:
        train = np.stack([render_sample(cat, None, split="train", index=i, size=size)[0] for i in range(n_train)])
        train = train.astype(np.float32) / 255
        mu, sd = train.mean(0), train.std(0)
        kinds = DEFECT_KINDS[cat]
        test = [render_sample(cat, None, split="test", index=i, size=size)[1] for i in range(n_test // 2)]
        test += [render_sample(cat, kinds[j % len(kinds)], index=j // len(kinds), size=size)[1] for j in range(n_test // 2)]
        x = np.stack(test).astype(np.float32) / 255
        score = (np.abs(x - mu) / (sd + 1e-3)).max(axis=(1, 2, 3))
        aucs[cat] = roc_auc_score([0] * (n_test // 2) + [1] * (n_test // 2), score)
    assert np.mean(list(aucs.values())) < 0.95, aucs
    assert min(aucs.values()) < 0.9, aucs


# ----------------------------------------------------------------------------- loader


def _write(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _make_layout(root: Path, size: int = 20) -> Path:
    """A small hand-made MVTec-layout category 'toy' with several image modes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    cat = root / "toy"
    _write(cat / "train" / "good" / "a.png", Image.fromarray(rgb))
    _write(cat / "train" / "good" / "b.PNG", Image.fromarray(rgb[..., 0]))  # L, upper-case extension
    _write(cat / "train" / "good" / "c.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))  # RGBA
    _write(cat / "train" / "good" / "d.jpg", Image.fromarray(rgb))
    (cat / "train" / "good" / "notes.txt").write_text("not an image: ignored")
    _write(cat / "test" / "good" / "000.png", Image.fromarray(rgb))
    _write(cat / "test" / "dent" / "000.png", Image.fromarray(rgb))
    m = np.zeros((size, size), np.uint8)
    m[5:9, 6:12] = 1  # VisA-style 0/1 mask
    _write(cat / "ground_truth" / "dent" / "000_mask.png", Image.fromarray(m))
    return root


def test_loader_modes_and_items(tmp_path):
    root = _make_layout(tmp_path)
    ds = MVTecDataset(root, "toy", "train", image_size=16)
    assert [Path(s.path).name for s in ds.samples] == ["a.png", "b.PNG", "c.png", "d.jpg"]
    for item in ds:
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert item["label"] == 0 and item["defect"] == "good" and item["category"] == "toy"
        assert item["mask"].shape == (1, 16, 16) and item["mask"].sum() == 0
    # L replicates to three equal channels; RGBA keeps its colour
    gray = ds[1]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.allclose(ds[2]["image"], ds[0]["image"])

    test = MVTecDataset(root, "toy", "test", image_size=40)
    assert test.labels == [1, 0] and test.defects == ["dent", "good"]
    item = test[0]
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert item["mask"].sum() == 4 * 6 * 4  # nearest x2 upsampling of a 4x6 box
    assert test.check(progress=False) == 2


@pytest.mark.parametrize(
    "array,mode,expected",
    [
        (np.full((8, 8), 65535, np.uint16), "I;16", 1.0),
        (np.full((8, 8), 32768, np.uint16), "I;16", 32768 / 65535),
        (np.full((8, 8), 1000, np.int32), "I", 1000 / 65535),
        (np.full((8, 8), 0.25, np.float32), "F", 0.25),
        (np.full((8, 8), 128, np.uint8), "L", 128 / 255),
    ],
)
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, array, mode, expected):
    img = Image.fromarray(array)
    assert img.mode == mode
    ext = "tif" if mode in ("I", "F") else "png"
    _write(tmp_path / "c" / "train" / "good" / f"x.{ext}", img)
    x = MVTecDataset(tmp_path, "c", "train", image_size=8)[0]["image"]
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-4)


def test_16bit_gradient_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    _write(tmp_path / "c" / "train" / "good" / "ramp.png", Image.fromarray(ramp))
    x = MVTecDataset(tmp_path, "c", "train", image_size=32)[0]["image"]
    assert x.min() == 0 and abs(float(x.max()) - 1) < 1e-6
    assert 0.45 < float(x[0, 0, 15:17].mean()) < 0.55


def test_palette_and_la_images(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    _write(tmp_path / "c" / "train" / "good" / "p.png", Image.fromarray(rgb).convert("P"))
    _write(tmp_path / "c" / "train" / "good" / "q.png", Image.fromarray(rgb[..., 0]).convert("LA"))
    for item in MVTecDataset(tmp_path, "c", "train", image_size=10):
        assert item["image"].shape == (3, 10, 10)
        assert float(item["image"].max()) > 0.5


def test_synthetic_through_loader(tiny_root):
    test = MVTecDataset(tiny_root, "screw", "test", image_size=32)
    assert sum(test.labels) == 5 and len(test) == 10
    for item in test:
        assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
        assert (item["mask"].sum() > 0) == (item["label"] == 1)
        assert item["defect"] in ("good",) + DEFECT_KINDS["screw"]
    loader = make_loader(test, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["label"].dtype == torch.int64 and len(batch["path"]) == 4


def test_make_loader_seeded_shuffle(tiny_root):
    ds = MVTecDataset(tiny_root, "brick", "test", image_size=16)
    order = lambda seed: [p for b in make_loader(ds, 3, shuffle=True, seed=seed) for p in b["path"]]
    assert order(7) == order(7)
    assert sorted(order(7)) == sorted(str(s.path) for s in ds.samples)
    assert order(7) != order(8)


def test_unified(tiny_root):
    uni = MVTecDataset.unified(tiny_root, ["brick", "washer"], "train", image_size=16)
    assert len(uni) == 2 * TINY["n_train"]
    assert [uni[i]["category"] for i in (0, len(uni) - 1)] == ["brick", "washer"]
    assert len(MVTecDataset.unified(tiny_root, None, "test", 16)) == len(SYNTH_CATEGORIES) * TINY["n_test"]


# ----------------------------------------------------------------------------- loader errors


def test_error_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MVTecDataset(tmp_path / "nowhere", "toy")


def test_error_missing_category_lists_existing(tmp_path):
    _make_layout(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"carpet.*toy"):
        MVTecDataset(tmp_path, "carpet")


def test_error_empty_train(tmp_path):
    (tmp_path / "toy" / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"toy/train/good"):
        MVTecDataset(tmp_path, "toy", "train")
    (tmp_path / "bare" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"bare/train/good"):
        MVTecDataset(tmp_path, "bare", "train")


def test_error_truncated_image(tmp_path):
    _make_layout(tmp_path, size=64)
    bad = tmp_path / "toy" / "train" / "good" / "a.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ds = MVTecDataset(tmp_path, "toy", "train", image_size=16)  # construction stays cheap
    with pytest.raises(OSError, match=r"a\.png"):
        ds[0]
    with pytest.raises(OSError, match=r"a\.png"):
        ds.check(progress=False)
    (tmp_path / "toy" / "train" / "good" / "e.png").write_bytes(b"not an image at all")
    with pytest.raises(OSError, match=r"e\.png"):
        MVTecDataset(tmp_path, "toy", "train")[4]


def test_error_missing_mask(tmp_path):
    _make_layout(tmp_path)
    (tmp_path / "toy" / "ground_truth" / "dent" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"dent/000\.png"):
        MVTecDataset(tmp_path, "toy", "test")


def test_error_mask_wrong_size(tmp_path):
    _make_layout(tmp_path)
    _write(tmp_path / "toy" / "ground_truth" / "dent" / "000_mask.png", Image.new("L", (7, 9)))
    ds = MVTecDataset(tmp_path, "toy", "test")
    with pytest.raises(ValueError, match=r"000_mask\.png.*7x9"):
        ds[0]
    with pytest.raises(ValueError, match=r"000_mask\.png"):
        ds.check(progress=False)


def test_btad_style_mask_name(tmp_path):
    _make_layout(tmp_path)
    gt = tmp_path / "toy" / "ground_truth" / "dent"
    (gt / "000_mask.png").rename(gt / "000.png")
    item = MVTecDataset(tmp_path, "toy", "test", image_size=20)[0]
    assert item["mask"].sum() == 24


# ----------------------------------------------------------------------------- digits


def test_digits_one_class():
    train = DigitsOneClass(3, "train", image_size=16)
    test = DigitsOneClass(3, "test", image_size=16)
    assert len(train) > 100 and set(train.labels) == {0}
    assert all(item == "3" for item in (train[i]["defect"] for i in range(len(train))))
    assert set(test.labels) == {0, 1} and len(test) == 540  # 30% of 1797, stratified
    assert 0.05 < np.mean(np.array(test.labels) == 0) < 0.15
    assert not set(train.indices) & set(test.indices)
    item = test[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert float(item["image"].max()) <= 1 and float(item["image"].min()) >= 0
    assert item["category"] == "digit3" and item["path"].startswith("digits/")
    again = DigitsOneClass(3, "test", image_size=16)
    assert [again[i]["path"] for i in range(len(again))] == [test[i]["path"] for i in range(len(test))]
    assert torch.equal(again[5]["image"], test[5]["image"])
    other = DigitsOneClass(3, "test", image_size=16, seed=1)
    assert [other[i]["path"] for i in range(20)] != [test[i]["path"] for i in range(20)]


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def test_mnist_one_class(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 30, True), ("t10k", 20, False)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    train = MNISTOneClass(tmp_path, 2, "train", image_size=32)
    assert len(train) == 3 and set(train.labels) == {0}
    test = MNISTOneClass(tmp_path, 2, "test", image_size=32)
    assert len(test) == 20 and sum(test.labels) == 18
    item = test[2]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 0 and item["defect"] == "2"
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*DigitsOneClass"):
        MNISTOneClass(tmp_path / "empty", 2, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x64" + bytes(5))
    with pytest.raises(ValueError, match="t10k-labels"):
        MNISTOneClass(tmp_path, 2, "test")

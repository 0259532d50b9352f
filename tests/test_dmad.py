"""DMAD: shapes, the deformation parts, separation of generated defects, save/load, errors."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.dmad import CPU_PRESET, DMAD

TINY = {**CPU_PRESET, "channels": (8, 16), "latent_dim": 16, "n_memory": 16, "estimator_channels": 8,
        "epochs": 2, "image_size": 32}


@pytest.fixture(scope="module")
def washer(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("synth"), seed=0, categories=["washer"], n_train=32, n_test=40, size=64)
    train = MVTecDataset(root, "washer", "train", 64)
    test = MVTecDataset(root, "washer", "test", 64)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = np.array([test[i]["label"] for i in range(len(test))])
    return train, images, labels


def test_registered_and_untrained_model_is_the_identity_warp():
    assert get_method("dmad") is DMAD
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for variant in ("pdm", "pdm+"):
        model = DMAD(**TINY, variant=variant, normalize=False)
        parts = model.inspect(x)
        assert len(parts["fields"]) == 2 and parts["fields"][0].shape == (2, 2, 32, 32)
        assert all(f.abs().max() == 0 for f in parts["fields"])  # heads start at zero offsets
        assert parts["A_rec"].shape == parts["A_df"].shape == (2, 32, 32)
        if variant == "pdm+":
            torch.testing.assert_close(parts["warped_input"], x, atol=1e-5, rtol=0)
            assert len(parts["backward_fields"]) == 2 and parts["mask"] is None
        else:
            assert parts["mask"].shape == (2, 1, 32, 32) and parts["backward_fields"] is None
            # with zero fields the reconstruction is the mask-blended reference itself
            m, bg = parts["mask"], parts["background"]
            torch.testing.assert_close(parts["reconstructions"][-1], m * parts["reference"] + (1 - m) * bg)


def test_training_updates_fields_and_memory(washer):
    train, _, _ = washer
    model = DMAD(**TINY, variant="pdm+")
    before = model.vq.memory.detach().clone()
    model.fit(make_loader(train, batch_size=8, shuffle=True, seed=0))
    assert not torch.equal(before, model.vq.memory.detach())
    assert model.history[-1]["L_rec"] < model.history[0]["L_rec"]
    assert model.history[-1]["L_cyc"] > 0
    parts = model.inspect(train[0]["image"][None])
    assert any(f.abs().max() > 0 for f in parts["fields"])


def test_separates_generated_defects_and_save_load(washer, tmp_path):
    train, images, labels = washer
    model = DMAD(**{**CPU_PRESET, "epochs": 25, "gamma_df": 1.0})  # the paper's loss weight
    model.fit(make_loader(train, batch_size=8, shuffle=True, seed=0))
    scores, maps = model.predict(images)
    assert maps.shape == (len(images), 64, 64) and torch.isfinite(maps).all()
    auroc = roc_auc_score(labels, scores.numpy())
    assert auroc >= 0.85, f"DMAD image AUROC on generated washers {auroc:.3f} < 0.85"
    path = model.save(tmp_path / "dmad.pt")
    loaded = AnomalyMethod.load(path)
    s2, m2 = loaded.predict(images)
    torch.testing.assert_close(s2, scores, rtol=0, atol=0)
    torch.testing.assert_close(m2, maps, rtol=0, atol=0)


def test_same_seed_same_numbers(washer):
    train, images, _ = washer
    runs = []
    for _ in range(2):
        model = DMAD(**TINY)
        model.fit(make_loader(train, batch_size=8, shuffle=True, seed=0))
        runs.append(model.predict(images[:4])[0])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="variant"):
        DMAD(variant="pdm++")
    with pytest.raises(ValueError, match="image_size"):
        DMAD(image_size=60)
    with pytest.raises(ValueError, match="same length"):
        DMAD(field_strides=(8, 2), max_offsets=(8.0,))
    model = DMAD(**TINY)
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="no images"):
        DMAD(**TINY).fit([])

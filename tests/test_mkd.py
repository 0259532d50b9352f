"""MKD: shapes, losses, separation of generated defects, save/load, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from vadlab.data import MVTecDataset, generate
from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.mkd import MKD, MKDConfig


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("synth"), seed=0, categories=["brick"], n_train=40, n_test=30, size=64)
    train = MVTecDataset(root, "brick", "train", 64)
    test = MVTecDataset(root, "brick", "test", 64)
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    items = [test[i] for i in range(len(test))]
    return x, torch.stack([t["image"] for t in items]), torch.tensor([t["label"] for t in items])


@pytest.fixture(scope="module")
def fitted(brick):
    x, _, _ = brick
    torch.manual_seed(0)
    model = MKD(image_size=64, epochs=40, batch_size=8, lr=1e-2, localization="discrepancy")
    return model.fit([x[i:i + 8] for i in range(0, len(x), 8)])


def test_registry_and_defaults():
    assert get_method("mkd") is MKD
    cfg = MKDConfig()
    assert (cfg.image_size, cfg.lamda, cfg.lr, cfg.epochs) == (128, 0.5, 1e-3, 601)
    assert MKDConfig.cpu_preset().image_size <= 128


def test_student_matches_teacher_shapes(fitted):
    model = fitted
    x = torch.rand(2, 3, 64, 64)
    for c, t in zip(model.student(x), model.teacher(x)):
        assert c.shape == t.shape
    assert [t.shape[-1] for t in model.teacher(x)] == [16, 8, 4, 2]


def test_vgg_teacher_needs_its_weights():
    from vadlab.backbones import WeightsUnavailableError

    try:
        MKD(image_size=64, backbone="vgg16")
    except WeightsUnavailableError as err:  # offline: a clear error that names the way out
        assert "efficientnet_lite0" in str(err)


def test_loss_is_value_plus_direction():
    model = MKD(image_size=64, lamda=0.5)
    x = torch.rand(3, 3, 64, 64)
    loss = model.loss_per_image(x)
    teacher, student = model.teacher(x), model.student(model.backbone.normalize(x))
    expected = sum(1 - F.cosine_similarity(c.flatten(1), t.flatten(1)) + 0.5 * F.mse_loss(c, t, reduction="none")
                   .flatten(1).mean(1) for c, t in zip(student, teacher))
    torch.testing.assert_close(loss, expected)


def test_separates_generated_defects(fitted, brick):
    _, test, labels = brick
    scores, maps = fitted.predict(test)
    assert maps.shape == (len(test), 64, 64)
    assert roc_auc_score(labels.numpy(), scores.numpy()) >= 0.85
    assert fitted.history[-1]["loss"] < 0.5 * fitted.history[0]["loss"]


def test_gradient_map_is_input_gradient(fitted, brick):
    _, test, _ = brick
    fitted.config = MKDConfig(**{**fitted.config.__dict__, "localization": "gradient", "sigma": 0.0})
    try:
        x = test[:2].clone().requires_grad_(True)
        fitted.loss_per_image(x).sum().backward()
        scores, maps = fitted.predict(test[:2])
        torch.testing.assert_close(maps, x.grad.mean(1).abs())
        torch.testing.assert_close(scores, fitted.loss_per_image(test[:2]).detach())
    finally:
        fitted.config = MKDConfig(**{**fitted.config.__dict__, "localization": "discrepancy", "sigma": 4.0})


def test_maps_at_input_size(fitted, brick):
    _, test, _ = brick
    big = F.interpolate(test[:2], size=(96, 96), mode="bilinear").clamp(0, 1)
    scores, maps = fitted.predict(big)
    assert scores.shape == (2,) and maps.shape == (2, 96, 96)


def test_save_load_round_trip(fitted, brick, tmp_path):
    _, test, _ = brick
    s1, m1 = fitted.predict(test[:6])
    loaded = AnomalyMethod.load(fitted.save(tmp_path / "mkd.pt"))
    assert isinstance(loaded, MKD)
    s2, m2 = loaded.predict(test[:6])
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_fit_runs_the_frozen_teacher_once_per_image(brick, monkeypatch):
    # without flips the teacher's maps are the same every epoch, so fit computes them once; with flips
    # (other images each epoch) it runs the teacher on every batch
    x, _, _ = brick
    for flips, expected in ((False, len(x)), (True, 3 * len(x))):
        model = MKD(image_size=64, epochs=3, batch_size=8, flips=flips)
        seen = []
        teacher = model.teacher
        monkeypatch.setattr(model, "teacher", lambda images: seen.append(len(images)) or teacher(images))
        model.fit([x[i:i + 8] for i in range(0, len(x), 8)])
        assert sum(seen) == expected, (flips, seen)
        assert len(model.history) == 3 and all(math.isfinite(h["loss"]) for h in model.history)


def test_cached_teacher_maps_give_the_same_loss(fitted, brick):
    x = brick[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(fitted.loss_per_image(x, fitted.teacher(x)), fitted.loss_per_image(x))


def test_bad_input_and_config():
    model = MKD(image_size=64)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="localization"):
        MKD(localization="saliency")
    with pytest.raises(ValueError, match="multiple of 32"):
        MKD(image_size=80)


def test_vgg_teacher_from_cached_weights(monkeypatch, fake_vgg16_hub, brick):
    """With VGG16 weights in the torch-hub cache, the paper's teacher is pool2..pool5 of VGG16 and
    the method trains and scores with it, offline."""
    hub, features = fake_vgg16_hub
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    x, test, _ = brick
    model = MKD(image_size=64, backbone="vgg16", epochs=2, batch_size=8, localization="gradient")
    probe = test[:2]
    with torch.no_grad():
        reference = [features[:end](model.backbone.normalize(probe)) for end in (10, 17, 24, 31)]  # pool2..pool5
        for t, r in zip(model.teacher(probe), reference):
            torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5)
    assert model.backbone.channels == [128, 256, 512, 512]
    model.fit([x[:16]])
    assert len(model.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in model.history)
    scores, maps = model.predict(test[:4])
    assert scores.shape == (4,) and maps.shape == (4, 64, 64)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.flatten(1).amax(1).gt(0).all()

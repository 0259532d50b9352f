"""PyramidFlow: separation of generated defects, template and volume normalization, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadlab.methods import get_method
from vadlab.methods.base import AnomalyMethod
from vadlab.methods.pyramidflow import (CPU_PRESET, PyramidFlow, PyramidFlowConfig, fourier_loss,
                                        pyramid_compose, pyramid_decompose)
from vadlab.nn.flows import FlowDivergenceError

SIZE = 128
#: the pretrained-encoder variant, small (EfficientNet-Lite0 blocks.1 -> 24 x 32 x 32, 3 levels, 2 stacks)
TINY = dict(encoder="efficientnet_lite0", encoder_layer="blocks.1", levels=3, stacks=2, kernel_size=3, epochs=4,
            batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def data(brick_washer_loaders):
    return brick_washer_loaders(SIZE)


@pytest.fixture(scope="module")
def fitted(data):
    out = {}
    for category in ("brick", "washer"):
        loader, images, labels = data[category]
        out[category] = (PyramidFlow(**TINY).fit(loader), images, labels, loader)
    return out


@pytest.mark.parametrize("category", ["brick", "washer"])  # one texture, one object
def test_separates_generated_defects(fitted, category):
    model, images, labels, _ = fitted[category]
    scores, maps = model.predict(images)
    assert maps.shape == (len(images), SIZE, SIZE) and torch.isfinite(maps).all()
    assert roc_auc_score(labels, scores.numpy()) >= 0.9


def test_template_is_the_mean_training_latent(fitted):
    model, _, _, loader = fitted["brick"]
    train = torch.cat(list(loader))
    with torch.no_grad():
        zs = model.latents(train)
    for z, t in zip(zs, model.template()):
        assert torch.allclose(z.mean(0), t, atol=1e-4)
    # a training image is closer to the template than the same image with a bright square pasted in
    defect = train[:4].clone()
    defect[:, :, 20:36, 20:36] = 1.0
    s_ok, _ = model.predict(train[:4])
    s_bad, _ = model.predict(defect)
    assert (s_bad > s_ok).all()


def test_whole_flow_inverts_and_keeps_volume(fitted):
    model, images, _, _ = fitted["washer"]
    model.double()
    try:
        feats = model.features(images[:2].double())
        pyr = pyramid_decompose(feats, model.config.levels)
        zs, logdet = model.flow(pyr)  # eval mode: running means of volume normalization
        back = pyramid_compose(model.flow.inverse(zs))
        assert (back - feats).abs().max() < 1e-5
        model.flow.train()
        _, logdet_train = model.flow(pyr)
        assert torch.allclose(logdet_train, torch.zeros(2, dtype=torch.float64), atol=1e-8)
    finally:
        model.float()
        model.eval()


def test_save_load_round_trip(fitted, tmp_path):
    model, images, _, _ = fitted["washer"]
    scores, maps = model.predict(images[:4])
    loaded = AnomalyMethod.load(model.save(tmp_path / "pf.pt"))
    assert isinstance(loaded, PyramidFlow)
    s2, m2 = loaded.predict(images[:4])
    assert torch.equal(scores, s2) and torch.equal(maps, m2)


def test_other_sizes_bad_input_and_unfitted(fitted):
    model, images, _, _ = fitted["brick"]
    _, maps = model.predict(torch.nn.functional.interpolate(images[:2], size=(48, 48), mode="bilinear"))
    assert maps.shape == (2, 48, 48)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(images[:, :1])
    with pytest.raises(RuntimeError, match="before fit"):
        PyramidFlow(**TINY).predict(images[:1])
    with pytest.raises(ValueError, match="multiple of"):
        PyramidFlow(**{**TINY, "epochs": 1}).fit([images[:2, :, :120, :120]])


def test_baseline_without_pretrained_model_trains(data):
    loader, images, _ = data["brick"]
    small = [torch.nn.functional.interpolate(b[:8], size=(64, 64), mode="bilinear") for b in loader]
    baseline = dict(encoder="none", channels=4, levels=3, stacks=1, kernel_size=3, epochs=1, batch_size=4, lr=1e-3)
    model = PyramidFlow(**baseline)
    lift0 = model.lift.raw.detach().clone()
    model.fit(small)
    assert model.backbone is None
    scores, maps = model.predict(images[:4])
    assert torch.isfinite(maps).all() and maps.shape == (4, SIZE, SIZE)
    assert model.train_size.tolist() == [64, 64]
    # the 3 -> C lift is frozen by default (the official code applies it under no_grad): not trained
    assert not model.lift.raw.requires_grad and torch.equal(model.lift.raw, lift0)
    w = model.lift.weight()
    assert torch.allclose(w.T @ w, torch.eye(3), atol=1e-5)  # still the orthonormal initialisation
    # ... and trainable on request
    trained = PyramidFlow(**baseline, train_lift=True).fit(small)
    assert trained.lift.raw.requires_grad and not torch.equal(trained.lift.raw.detach(), lift0)


def test_fourier_loss_is_unnormalised_by_default():
    # the official train.py: torch.fft.fft2(diff).abs().mean(), torch's default norm ("backward")
    assert PyramidFlowConfig().fft_norm == "backward"
    assert PyramidFlowConfig.cpu_preset().fft_norm == "backward"
    diff = torch.rand(3, 16, 8)
    official = torch.fft.fft2(diff).abs().mean()
    assert torch.allclose(fourier_loss(diff), official)
    assert torch.allclose(fourier_loss(diff, "ortho") * (16 * 8) ** 0.5, official)
    zs = [torch.rand(2, 4, 16, 16), torch.rand(2, 4, 8, 8)]
    model = PyramidFlow(encoder="none", channels=4, levels=2, stacks=1, kernel_size=3)
    ortho = PyramidFlow(encoder="none", channels=4, levels=2, stacks=1, kernel_size=3, fft_norm="ortho")
    assert torch.allclose(model.pair_loss(zs), ortho.pair_loss(zs) * 16)  # sqrt(16 x 16)
    with pytest.raises(ValueError, match="fft_norm"):
        PyramidFlow(encoder="none", channels=4, levels=2, stacks=1, fft_norm="forward")


def test_divergence_raises_named_error(data):
    loader, _, _ = data["brick"]
    with pytest.raises(FlowDivergenceError, match=r"step \d+"):
        PyramidFlow(**{**TINY, "epochs": 2, "lr": 1e12, "clamp": 1e6, "grad_clip": 1e30}).fit(loader)


def test_registry_presets_and_defaults():
    assert get_method("pyramidflow") is PyramidFlow
    cfg = PyramidFlowConfig()
    assert (cfg.channels, cfg.levels, cfg.stacks, cfg.kernel_size, cfg.batch_size, cfg.epochs) == (16, 4, 4, 7, 2, 15)
    assert PyramidFlowConfig.cpu_preset() == PyramidFlowConfig(**CPU_PRESET)


def test_training_history_has_one_entry_per_epoch(fitted):
    model = fitted["brick"][0]
    losses = [h["loss"] for h in model.history]
    assert len(losses) == TINY["epochs"] and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the pair loss falls over training

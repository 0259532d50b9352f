"""CFLOW-AD: separation of generated defects, training-data normalisation, save/load, errors, divergence."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadlab.methods import get_method
from vadlab.methods.base import AnomalyMethod
from vadlab.methods.cflow import CPU_PRESET, CFlow, CFlowConfig
from vadlab.nn.flows import FlowDivergenceError, jacobian_logdet

SIZE = 128
#: small but faithful: 2 scales (strides 4, 8), 4 conditional couplings, P = 64, 8 passes over the fibers
TINY = dict(layers=("blocks.1", "blocks.2"), coupling_blocks=4, condition_channels=64, meta_epochs=4,
            sub_epochs=2, warmup_epochs=1, lr=1e-3)


@pytest.fixture(scope="module")
def data(brick_washer_loaders):
    return brick_washer_loaders(SIZE)


@pytest.fixture(scope="module")
def fitted(data):
    out = {}
    for category in ("brick", "washer"):
        loader, images, labels = data[category]
        torch.manual_seed(0)
        model = CFlow(**TINY).fit(loader)
        out[category] = (model, images, labels)
    return out


@pytest.mark.parametrize("category", ["brick", "washer"])  # one texture, one object
def test_separates_generated_defects(fitted, category):
    model, images, labels = fitted[category]
    scores, maps = model.predict(images)
    assert maps.shape == (len(images), SIZE, SIZE) and torch.isfinite(maps).all()
    assert roc_auc_score(labels, scores.numpy()) >= 0.9


def test_scores_do_not_depend_on_the_other_test_images(fitted):
    model, images, _ = fitted["brick"]
    alone, _ = model.predict(images[:3])
    together, _ = model.predict(images)
    assert torch.allclose(alone, together[:3], atol=1e-5)  # unlike the official test-set max normalisation
    assert model.train_max_logp.shape == (2,) and torch.isfinite(model.train_max_logp).all()


def test_decoder_is_invertible_with_exact_logdet(fitted):
    model, images, _ = fitted["brick"]
    decoder = model.decoders[0].double()
    try:
        z = torch.randn(2, model.backbone.channels[0], dtype=torch.float64)
        c = model.condition(2, 1).double()
        u, logdet = decoder(z, c)
        assert (decoder.inverse(u, c) - z).abs().max() < 1e-5
        ref = jacobian_logdet(lambda v: decoder(v, c[:1])[0], z[:1])
        assert torch.allclose(logdet[:1], ref, atol=1e-7)
        assert logdet.abs().max() > 1e-3  # training moved it away from the identity
    finally:
        decoder.float()


def test_save_load_round_trip(fitted, tmp_path):
    model, images, _ = fitted["washer"]
    scores, maps = model.predict(images[:4])
    path = model.save(tmp_path / "cflow.pt")
    loaded = AnomalyMethod.load(path)
    assert isinstance(loaded, CFlow)
    s2, m2 = loaded.predict(images[:4])
    assert torch.equal(scores, s2) and torch.equal(maps, m2)


def test_bad_input_and_unfitted(fitted):
    model, images, _ = fitted["brick"]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(images[0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model.predict(images * 255)
    with pytest.raises(RuntimeError, match="before fit"):
        CFlow(**TINY).predict(images[:1])
    with pytest.raises(ValueError, match="multiple of 4"):
        CFlow(condition_channels=30)


def test_divergence_raises_named_error(data):
    loader, _, _ = data["brick"]
    with pytest.raises(FlowDivergenceError, match=r"step \d+.*scale \d"):
        CFlow(**{**TINY, "lr": 1e12, "clamp": 1e6, "meta_epochs": 1, "warmup_epochs": 0}).fit(loader)


def test_registry_presets_and_defaults():
    assert get_method("cflow") is CFlow
    cfg = CFlowConfig()
    assert (cfg.coupling_blocks, cfg.clamp, cfg.condition_channels, cfg.fiber_batch, cfg.lr) == (8, 1.9, 128, 256, 2e-4)
    assert CFlowConfig.cpu_preset() == CFlowConfig(**CPU_PRESET)


def test_training_history_records_a_falling_likelihood_loss(fitted):
    model = fitted["brick"][0]
    losses = [h["loss"] for h in model.history]
    assert len(losses) == TINY["meta_epochs"] * TINY["sub_epochs"]  # one entry per sub-epoch
    assert losses[-1] < losses[0]  # the negative log-likelihood of the training fibers falls
    assert [h["epoch"] for h in model.history] == list(range(len(losses)))

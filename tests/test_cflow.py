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


# -- held-out normal images and early stopping ------------------------------------------------------------
#: TINY with one scale and few steps: cheap fits for the held-out / early-stopping tests
QUICK = {**TINY, "layers": ("blocks.1",), "meta_epochs": 3, "sub_epochs": 1}


def test_held_out_split_is_seeded_and_disjoint_from_the_fitted_images():
    model = CFlow(**QUICK, val_fraction=0.25)
    fitted, held_out = model.split_images(40)
    assert len(held_out) == 10 and len(fitted) == 30
    assert set(fitted.tolist()).isdisjoint(held_out.tolist())
    assert sorted(fitted.tolist() + held_out.tolist()) == list(range(40))
    again = CFlow(**QUICK, val_fraction=0.25).split_images(40)[1]
    other = CFlow(**QUICK, val_fraction=0.25, seed=1).split_images(40)[1]
    assert torch.equal(held_out, again) and not torch.equal(held_out, other)
    everything, none = CFlow(**QUICK).split_images(40)  # val_fraction = 0: every image is fitted
    assert torch.equal(everything, torch.arange(40)) and len(none) == 0


def test_held_out_images_are_not_fitted(data):
    """With held-out images the fit is the fit on the other images alone (same seed, same order)."""
    loader, _, _ = data["brick"]
    images = torch.cat(list(loader))
    held = CFlow(**QUICK, val_fraction=0.25).fit(list(images.split(16)))
    assert len(held.val_indices) == 10
    fitted_idx = [i for i in range(len(images)) if i not in held.val_indices]
    plain = CFlow(**QUICK).fit(list(images[fitted_idx].split(16)))
    assert all("val_nll" in h for h in held.history) and not any("val_nll" in h for h in plain.history)
    assert [h["loss"] for h in held.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    if held.best_epoch == len(held.history) - 1:  # the kept weights are the last ones: the same model
        assert torch.allclose(held.train_max_logp, plain.train_max_logp, atol=1e-4)


def test_early_stopping_keeps_the_weights_with_the_best_held_out_nll(data):
    loader, _, _ = data["washer"]
    batches = list(torch.cat([x for x in loader]).split(16))
    # a learning rate high enough that the held-out NLL does not fall monotonically over the sub-epochs
    model = CFlow(**{**QUICK, "meta_epochs": 4, "lr": 1e-2, "warmup_epochs": 0}, val_fraction=0.25).fit(batches)
    val = [h["val_nll"] for h in model.history]
    assert len(val) == 4 and model.best_epoch == min(range(len(val)), key=val.__getitem__)
    held = model.split_images(len(torch.cat(batches)))[1]
    feats = [torch.cat([model.backbone(b)[0] for b in batches])]
    kept = model._mean_nll(*model._fibers(feats, held))
    assert kept == pytest.approx(min(val), rel=1e-5)  # the kept state is the best evaluation, not the last


def test_patience_stops_training_early_and_restores_the_best_state(data, monkeypatch):
    loader, _, _ = data["brick"]
    batches = list(torch.cat(list(loader)).split(16))
    curve = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.4])  # held-out NLL: best at evaluation 1, then it rises
    states = []

    def fake_nll(self, fibers, conds):
        states.append({k: v.clone() for k, v in self.decoders.state_dict().items()})
        return next(curve)

    monkeypatch.setattr(CFlow, "_mean_nll", fake_nll)
    model = CFlow(**{**QUICK, "meta_epochs": 6}, val_fraction=0.25, patience=2).fit(batches)
    assert [h["val_nll"] for h in model.history] == [1.0, 0.5, 0.7, 0.8]  # stopped 2 evaluations after the best
    assert model.best_epoch == 1
    kept = model.decoders.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)
    assert any(not torch.equal(kept[k], states[-1][k]) for k in kept)  # not the last weights


def test_val_fraction_zero_reproduces_the_old_fit(data):
    loader, images, _ = data["brick"]
    batches = list(torch.cat(list(loader)).split(16))  # the loader reshuffles on every pass: fix one order
    old = CFlow(**QUICK).fit(batches)
    again = CFlow(**QUICK, val_fraction=0.0, patience=3).fit(batches)  # patience is unused without held-out images
    assert torch.equal(again.train_max_logp, old.train_max_logp)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in old.history]
    assert torch.equal(again.predict(images[:4])[0], old.predict(images[:4])[0])
    assert again.val_indices == [] and again.best_epoch is None


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_val_fraction_raises(fraction):
    with pytest.raises(ValueError, match=r"val_fraction.*\[0, 1\)"):
        CFlow(**QUICK, val_fraction=fraction)
    with pytest.raises(ValueError, match="patience"):
        CFlow(**QUICK, patience=-1)


def test_too_few_images_to_hold_out_raises():
    with pytest.raises(ValueError, match="at least one held-out and one fitted image"):
        CFlow(**QUICK, val_fraction=0.1).split_images(4)  # round(0.4) = 0 held out
    with pytest.raises(ValueError, match="at least one held-out and one fitted image"):
        CFlow(**QUICK, val_fraction=0.9).split_images(2)  # round(1.8) = 2: nothing left to fit

"""DiAD: zero-initialised guidance, gradient flow through SG, a tiny end-to-end run, save/load, scoring, errors."""

import pytest
import torch

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.diad import (CPU_PRESET, DiAD, DiADConfig, build_networks, masked_errors, parameter_counts,
                                 pooled_max)

TINY = dict(ae_channels=8, ae_channel_mult=(1, 2, 2), ae_res_blocks=1, model_channels=16, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(2,), num_heads=2, hint_channels=(8, 16, 16),
            train_batch_size=8, batch_size=16)


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, categories=["brick"], n_train=32, n_test=16, size=64)
    return root


def _sg_loss(nets, z, t, x, noise):
    guidance = nets["sg"](z, t, x)
    return (nets["denoiser"](z, t, guidance) - noise).pow(2).mean()


def test_zero_init_guidance_starts_as_the_plain_denoiser_and_gradients_reach_sg():
    torch.manual_seed(0)
    cfg = DiADConfig(**TINY)
    nets = build_networks(cfg)
    # make the denoiser non-trivial (its output conv is zero-initialised too)
    torch.nn.init.normal_(nets["denoiser"].out[-1].weight, std=0.1)
    nets["sg"].copy_from(nets["denoiser"].encoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    noise = torch.randn_like(z)
    guided = nets["denoiser"](z, t, nets["sg"](z, t, x))
    plain = nets["denoiser"](z, t)
    assert plain.abs().max() > 0 and torch.equal(guided, plain)

    sg = nets["sg"]
    inner = list(sg.encoder.parameters()) + list(sg.hint[:-1].parameters()) + list(sg.sff.parameters())
    zero_convs = list(sg.zero_skips.parameters()) + list(sg.zero_middle.parameters()) + list(sg.hint[-1].parameters())
    _sg_loss(nets, z, t, x, noise).backward()
    # behind the zero-initialised connections nothing receives gradient yet; the connections themselves do
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in inner)
    assert sum(p.grad.abs().sum() for p in zero_convs if p.grad is not None) > 0
    torch.optim.SGD(sg.parameters(), lr=0.1).step()
    sg.zero_grad()
    _sg_loss(nets, z, t, x, noise).backward()
    # after one update the connections are open: the encoder copy, the SFF blocks and the stem's zero conv learn
    for part in (sg.encoder, sg.sff, sg.hint[-1]):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0
    torch.optim.SGD(sg.parameters(), lr=0.1).step()
    sg.zero_grad()
    _sg_loss(nets, z, t, x, noise).backward()
    # one more and the conv-SiLU image stem behind it learns too
    assert sum(p.grad.abs().sum() for p in sg.hint[:-1].parameters() if p.grad is not None) > 0
    assert not torch.equal(nets["denoiser"](z, t, sg(z, t, x)), nets["denoiser"](z, t))


def test_sff_fuses_every_higher_scale_output_into_every_lowest_scale_output():
    cfg = DiADConfig(**{**TINY, "num_res_blocks": 2})
    sg = build_networks(cfg)["sg"]
    assert len(sg.last) == 3 and len(sg.prev) == 3  # the paper's three sub-layers per SGEB
    assert len(sg.sff) == 3 and all(len(row) == 3 for row in sg.sff)
    block = sg.sff[0][0]
    assert isinstance(block[1], torch.nn.InstanceNorm2d) and isinstance(block[2], torch.nn.SiLU)
    assert block[0].stride == (2, 2) and block[0].kernel_size == (3, 3)
    assert build_networks(DiADConfig(**{**TINY, "use_sff": False}))["sg"].sff is None
    assert "sg" not in build_networks(DiADConfig(**{**TINY, "use_sg": False}))


def test_tiny_diad_trains_predicts_and_round_trips(brick, tmp_path):
    train = make_loader(MVTecDataset(brick, "brick", "train", 32), batch_size=8, shuffle=True, seed=0)
    model = DiAD(**TINY, ae_steps=40, ldm_steps=30, sg_steps=30, seed=3)
    model.fit(train)
    for stage, losses in model.losses.items():
        assert len(losses) > 0 and all(torch.isfinite(torch.tensor(losses))), stage
    assert model.losses["ae"][-1] < model.losses["ae"][0]  # the autoencoder learns
    assert model.latent_scale is not None and torch.isfinite(model.latent_scale)
    test = MVTecDataset(brick, "brick", "test", 32)
    batch = next(iter(make_loader(test, batch_size=len(test))))
    scores, maps = model.predict(batch["image"])
    assert scores.shape == (len(test),) and maps.shape == (len(test), 32, 32)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all() and (maps >= 0).all()
    # even after a few steps the reconstruction errs more inside the defects than on the normal rest
    defective = batch["label"] == 1
    recon = model.reconstruct(batch["image"][defective])
    assert recon.shape == batch["image"][defective].shape and 0 <= recon.min() and recon.max() <= 1
    inside, outside = masked_errors(batch["image"][defective], recon, batch["mask"][defective])
    assert inside > 1.2 * outside
    assert model.autoencode(batch["image"][:2]).shape == (2, 3, 32, 32)
    # deterministic: the inference noise is seeded
    s_again, _ = model.predict(batch["image"])
    assert torch.equal(s_again, scores)
    path = model.save(tmp_path / "diad.pt")
    loaded = AnomalyMethod.load(path)
    s2, m2 = loaded.predict(batch["image"])
    assert torch.equal(s2, scores) and torch.equal(m2, maps)
    # no-SG ablation trains too and gives different reconstructions
    plain = DiAD(**TINY, ae_steps=5, ldm_steps=5, sg_steps=5, use_sg=False)
    plain.fit(train)
    assert plain.sg is None and plain.reconstruct(batch["image"][:2]).shape == (2, 3, 32, 32)


def test_pooled_max_and_parameter_counts():
    maps = torch.zeros(1, 64, 64)
    maps[0, 10, 10] = 64.0  # one hot pixel: 1 pass of 8x8 average pooling spreads it to 1.0
    assert pooled_max(maps, 8, 1).item() == pytest.approx(1.0)
    patch = torch.zeros(1, 64, 64)
    patch[0, 20:24, 20:24] = 1.0  # a 4x4 spot fills at most a quarter of an 8x8 window
    assert pooled_max(patch, 8, 1).item() == pytest.approx(16 / 64)
    assert pooled_max(torch.ones(2, 64, 64), 8, 8).tolist() == [1.0, 1.0]
    small = parameter_counts(DiADConfig())
    assert small["total"] < 5_000_000
    paper = parameter_counts(DiADConfig.paper())
    assert paper["autoencoder"] == pytest.approx(83.7e6, rel=0.02)  # table 11: SD's KL-f8 autoencoder
    # no text cross-attention here, so a little below the paper's 859 M / 471 M
    assert 0.9 * 859e6 < paper["denoiser"] < 859e6 and 0.9 * 471e6 < paper["sg"] < 471e6


def test_score_size_sets_the_backbone_resolution_and_maps_stay_at_the_input_size():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    recon = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    seen = {}

    def spy(model):
        """Record the side of every image batch the scoring backbone receives and of the maps it returns."""
        def hook(module, args, out):
            seen.setdefault(id(model), []).append((args[0].shape[-1], [f.shape[-1] for f in out]))
        model.backbone.register_forward_hook(hook)
        return model

    paper = spy(DiAD(**TINY))  # default: the paper's 256 px
    assert paper.config.score_size == 256 and DiADConfig.cpu_preset().score_size == 256
    native = spy(DiAD(**TINY, score_size=None))
    m_paper, m_native = paper.anomaly_map(images, recon), native.anomaly_map(images, recon)
    # Lite0 blocks 1, 2, 4 have strides 4, 8, 16: the paper's 64 / 32 / 16 px grids at 256 px
    assert seen[id(paper)] == [(256, [64, 32, 16])] * 2
    assert seen[id(native)] == [(32, [8, 4, 2])] * 2
    assert m_paper.shape == m_native.shape == (2, 32, 32) and (m_paper >= 0).all()
    assert not torch.allclose(m_paper, m_native, atol=1e-3)  # the resolution changes the map
    assert paper.anomaly_map(images, images).abs().max() < 1e-4  # identical input and reconstruction: no anomaly
    # the resize keeps the aspect ratio (shorter side to score_size) and leaves images of that size unchanged
    assert paper.score_view(torch.rand(1, 3, 32, 64)).shape == (1, 3, 256, 512)
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(paper.score_view(x), x)
    assert DiAD(**TINY, score_size=64).score_view(x).shape == (1, 3, 64, 64)
    for bad in (0, 16, 100.0, True):
        with pytest.raises(ValueError, match="score_size"):
            DiAD(**TINY, score_size=bad)


def test_masked_errors_tell_a_repairing_reconstruction_from_a_copying_one():
    images = torch.rand(2, 3, 16, 16)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:8, 4:8] = 1
    assert masked_errors(images, images.clone(), masks) == (0.0, 0.0)  # copies the defect
    repaired = images.clone()
    repaired[:, :, 4:8, 4:8] = 2.0  # differs exactly inside the defect, by >= 1 everywhere there
    inside, outside = masked_errors(images, repaired, masks)
    assert inside >= 1.0 and outside == 0.0
    with pytest.raises(ValueError, match="some but not all"):
        masked_errors(images, repaired, torch.zeros(2, 1, 16, 16))


def test_config_registry_and_errors():
    assert get_method("diad") is DiAD
    assert DiADConfig.paper().model_channels == 320 and DiADConfig.cpu_preset().ae_steps == CPU_PRESET["ae_steps"]
    with pytest.raises(ValueError, match="hint_channels"):
        build_networks(DiADConfig(**{**TINY, "hint_channels": (8, 16)}))
    with pytest.raises(ValueError, match="noise_step=1000"):
        DiAD(**TINY, noise_step=1000)
    model = DiAD(**TINY)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(torch.rand(1, 3, 32, 32))
    model.latent_scale = torch.tensor(1.0)
    with pytest.raises(ValueError, match="divisible by 8"):
        model.predict(torch.rand(1, 3, 36, 36))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.predict(torch.rand(1, 3, 32, 32) * 255)

"""Invertible layers: exact inverses and log-determinants equal to autograd's full Jacobian (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from vadlab.methods.pyramidflow import (LevelCoupling, PyramidFlowNet, VolumeNorm, VolumeNormLift,
                                        pyramid_compose, pyramid_decompose)
from vadlab.nn.flows import (ActNorm, AffineCoupling, FixedPermutation, InvertibleConv1x1, SequentialFlow,
                             jacobian_logdet, positional_encoding_2d, soft_clamp, standard_normal_logprob)

@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Non-trivial weights (the last layers are zero-initialised, which would make every test trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module.double()


def test_soft_clamp_bounds_and_slope():
    s = torch.linspace(-100, 100, 1001)
    out = soft_clamp(s, 1.9)
    assert out.abs().max() < 1.9
    small = torch.tensor([1e-4])
    assert torch.allclose(soft_clamp(small, 1.9), small * 2 / math.pi, rtol=1e-6)


@pytest.mark.parametrize("cond", [0, 4])
def test_affine_coupling_vectors(cond):
    layer = randomize(AffineCoupling(5, cond_channels=cond, hidden=7, clamp=1.9, subnet="mlp"))
    x = torch.randn(3, 5)
    c = torch.randn(3, cond) if cond else None
    y, logdet = layer(x, c)
    assert torch.allclose(layer.inverse(y, c), x, atol=1e-10)
    assert (y[:, :3] == x[:, :3]).all()  # the kept half passes unchanged
    ref = jacobian_logdet(lambda v: layer(v, c[:1] if c is not None else None)[0], x[:1])
    assert torch.allclose(logdet[:1], ref, atol=1e-8)
    assert logdet.abs().max() > 1e-3  # not trivially the identity


def test_affine_coupling_maps_with_condition():
    layer = randomize(AffineCoupling(4, cond_channels=2, hidden=6, subnet="conv", kernel_size=3), seed=1)
    x = torch.randn(2, 4, 3, 3)
    c = torch.randn(2, 2)  # a per-sample vector, broadcast over positions
    y, logdet = layer(x, c)
    assert torch.allclose(layer.inverse(y, c), x, atol=1e-10)
    ref = jacobian_logdet(lambda v: layer(v, c[1:2])[0], x[1:2])
    assert torch.allclose(logdet[1:2], ref, atol=1e-8)


def test_permutation_and_conv1x1():
    perm = FixedPermutation(6, seed=3)
    x = torch.randn(4, 6)
    y, ld = perm(x)
    assert torch.equal(perm.inverse(y), x) and torch.equal(ld, torch.zeros(4))
    assert torch.allclose(jacobian_logdet(lambda v: perm(v)[0], x[:1]), torch.zeros(1), atol=1e-12)
    for vn in (False, True):
        conv = randomize(InvertibleConv1x1(3, seed=0, volume_norm=vn), scale=0.3)
        xm = torch.randn(2, 3, 2, 3)
        ym, ldm = conv(xm)
        assert torch.allclose(conv.inverse(ym), xm, atol=1e-10)
        ref = jacobian_logdet(lambda v: conv(v)[0], xm[:1])
        assert torch.allclose(ldm[:1], ref, atol=1e-8)
        if vn:
            assert torch.allclose(ldm, torch.zeros(2), atol=1e-12)
        else:
            assert ldm.abs().max() > 1e-3


def test_actnorm_initialises_to_standardise_and_inverts():
    layer = ActNorm(3, rel_floor=1e-4)  # scales 100 : 1 : 0.01, all above 1e-4 x the mean std: no flooring
    x = torch.randn(50, 3) * torch.tensor([100.0, 1.0, 0.01]) + 7.0
    layer.initialize(x)
    y, logdet = layer(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-8) and torch.allclose(y.std(0), torch.ones(3))
    assert torch.allclose(layer.inverse(y), x, atol=1e-9)
    ref = jacobian_logdet(lambda v: layer(v)[0], x[:1])
    assert torch.allclose(logdet[:1], ref, atol=1e-8)
    maps = torch.randn(2, 3, 2, 2)
    ym, ldm = layer(maps)
    assert torch.allclose(ldm[:1], jacobian_logdet(lambda v: layer(v)[0], maps[:1]), atol=1e-8)


def test_actnorm_floor_keeps_a_constant_channel_from_amplifying_noise():
    # channel 1 is constant on the training data; a test deviation of 1e-3 in it must stay small after
    # actnorm (the old absolute floor of 1e-6 on the std made it 1e3, a 10^6-fold amplification)
    train = torch.randn(500, 3)
    train[:, 1] = 0.5
    layer = ActNorm(3)
    layer.initialize(train)
    test = torch.zeros(1, 3)
    test[0, 1] = 0.5 + 1e-3
    y, _ = layer(test)
    mean_std = train.std(0).mean()  # (1 + 0 + 1) / 3: the floor is 0.1 x this
    assert abs(y[0, 1].item()) <= 1e-3 / (0.1 * mean_std.item()) * 1.001
    assert abs(y[0, 1].item()) < 0.1  # old floor: 1e3
    assert layer.log_scale[1].item() <= -math.log(0.1 * mean_std.item()) + 1e-5
    # the other channels are still standardised exactly
    y_train, _ = layer(train)
    assert torch.allclose(y_train[:, [0, 2]].std(0), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="rel_floor"):
        ActNorm(3, rel_floor=0.0)


def test_sequential_flow_whole_inverse_and_logdet():
    flow = SequentialFlow([ActNorm(6), AffineCoupling(6, 4, hidden=8), FixedPermutation(6, 1), AffineCoupling(6, 4, hidden=8),
                           InvertibleConv1x1(6, seed=2), AffineCoupling(6, 4, hidden=8)])
    randomize(flow, seed=2, scale=0.4)
    x, c = torch.randn(3, 6), torch.randn(3, 4)
    z, logdet = flow(x, c)
    assert (flow.inverse(z, c) - x).abs().max() < 1e-5
    for i in range(3):
        ref = jacobian_logdet(lambda v: flow(v, c[i:i + 1])[0], x[i:i + 1])
        assert torch.allclose(logdet[i:i + 1], ref, atol=1e-7)
    # change of variables: a flow density integrates like a density, log p = log N(z) + logdet
    assert torch.isfinite(standard_normal_logprob(z) + logdet).all()


def test_standard_normal_logprob():
    z = torch.randn(5, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(standard_normal_logprob(z), expected)


def test_positional_encoding_2d():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    assert torch.allclose(pe[0], torch.sin(torch.arange(5.0)).expand(3, 5).float(), atol=1e-6)
    assert torch.allclose(pe[4], torch.sin(torch.arange(3.0))[:, None].expand(3, 5).float(), atol=1e-6)
    assert torch.allclose(pe[1] ** 2 + pe[0] ** 2, torch.ones(3, 5).float(), atol=1e-6)
    flat = pe.flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(15) * 10).min() > 0.1  # every position has its own code
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_volume_norm_zero_logdet_and_running_mean():
    vn = VolumeNorm("cvn", momentum=0.1)
    s = torch.randn(3, 4, 2, 2) + 2.0
    out = vn(s)
    assert torch.allclose(out.sum(1), torch.zeros(3, 2, 2), atol=1e-12)  # log|det| = 0 for every sample
    assert torch.allclose(vn.running_mean, s.mean(1, keepdim=True).mean(0, keepdim=True))
    vn(s * 0)  # second batch: running = 0.9 * old + 0.1 * 0
    assert torch.allclose(vn.running_mean, 0.9 * s.mean(1, keepdim=True).mean(0, keepdim=True))
    vn.eval()
    assert torch.allclose(vn(s), s - vn.running_mean)
    svn = VolumeNorm("svn")
    assert torch.allclose(svn(s).sum((2, 3)), torch.zeros(3, 4), atol=1e-12)


def test_level_coupling_with_volume_norm_has_zero_logdet():
    coupling = randomize(LevelCoupling(3, 1, kernel_size=3, clamp=2.0, vn="cvn", momentum=0.1), seed=4)
    x, nb = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    coupling.train()
    y, logdet = coupling(x, nb)
    assert torch.allclose(logdet, torch.zeros(2), atol=1e-10)
    ref = jacobian_logdet(lambda v: coupling(v, nb[:1])[0], x[:1])
    assert torch.allclose(ref, torch.zeros(1), atol=1e-8)
    assert (y - x).abs().max() > 1e-2  # yet it is not the identity
    assert torch.allclose(coupling.inverse(y, nb), x, atol=1e-10)


def test_pyramid_decomposition_is_exactly_invertible():
    x = torch.randn(2, 3, 16, 16)
    pyr = pyramid_decompose(x, 3)
    assert [p.shape[-1] for p in pyr] == [16, 8, 4]
    assert (pyramid_compose(pyr) - x).abs().max() < 1e-12


@pytest.mark.parametrize("train", [True, False])
def test_pyramid_flow_inverse_and_logdet(train):
    net = PyramidFlowNet(channels=2, levels=3, stacks=2, kernel_size=3, clamp=2.0, vn="cvn", seed=0)
    randomize(net, seed=5, scale=0.3)
    pyr = pyramid_decompose(torch.randn(2, 2, 8, 8), 3)
    net.train()
    net(pyr)  # set the running means
    net.train(train)
    zs, logdet = net(pyr)
    if train:
        assert torch.allclose(logdet, torch.zeros(2), atol=1e-9)  # volume normalization: |det J| = 1
    back = net.inverse(zs)
    assert max((a - b).abs().max() for a, b in zip(back, pyr)) < 1e-5
    sizes = [p[0].numel() for p in pyr]

    def flat_fn(v):
        parts = list(v.reshape(1, -1).split(sizes, dim=1))
        levels = [p.reshape(1, *q.shape[1:]) for p, q in zip(parts, pyr)]
        return torch.cat([z.reshape(1, -1) for z in net(levels)[0]], dim=1)

    x0 = torch.cat([p[:1].reshape(1, -1) for p in pyr], dim=1)
    if not train:  # in training mode the batch statistic couples samples; per-sample check in eval mode
        ref = jacobian_logdet(flat_fn, x0)
        assert torch.allclose(logdet[:1], ref, atol=1e-7)
    else:
        ref = jacobian_logdet(flat_fn, x0)  # per-sample normalization: the Jacobian is still volume-preserving
        assert torch.allclose(ref, torch.zeros(1), atol=1e-7)


def test_lift_is_volume_normalised_and_left_invertible():
    lift = randomize(VolumeNormLift(3, 8), seed=6)
    w = lift.weight()
    assert torch.allclose(torch.linalg.det(w.T @ w), torch.tensor(1.0), atol=1e-10)
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(lift.inverse(lift(x)), x, atol=1e-10)

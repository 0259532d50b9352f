"""Vector quantisation: nearest memory items, compression loss, straight-through gradient."""

import pytest
import torch

from vadlab.nn.vq import VectorQuantizer


def _vq(n=7, d=5, seed=0):
    torch.manual_seed(seed)
    return VectorQuantizer(n, d, beta=0.25)


def test_returns_nearest_items_by_brute_force():
    vq = _vq()
    z = torch.randn(2, 5, 3, 4)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    dist = ((flat[:, None, :] - vq.memory[None]) ** 2).sum(-1)  # [P, N] squared L2
    expected = dist.argmin(1).view(2, 3, 4)
    assert torch.equal(out.indices, expected)
    # the forward value is exactly the chosen memory items
    torch.testing.assert_close(out.z_q, vq.memory[expected].permute(0, 3, 1, 2))
    # a query equal to a memory item maps to that item
    item = vq.memory.detach()[3].view(1, 5, 1, 1)
    assert vq(item).indices.item() == 3


def test_straight_through_gradient_is_identity():
    vq = _vq()
    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    weights = torch.randn(2, 5, 3, 4)
    (vq(z).z_q * weights).sum().backward()
    # d z_q / d z_e = I: the upstream gradient arrives unchanged
    torch.testing.assert_close(z.grad, weights)


def test_compression_loss_terms_and_their_gradients():
    vq = _vq()
    z = torch.randn(1, 5, 2, 2, requires_grad=True)
    out = vq(z)
    zq = out.z_q.detach()
    expected = (z.detach() - zq).pow(2).mean() * 1.25
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    # encoder side sees only beta * d/dz ||z - SG(zq)||^2
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - zq) / z.numel())
    # memory side sees only d/dz_n ||SG(z) - z_n||^2 on the chosen items
    grad = torch.zeros_like(vq.memory)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 5)
    for p, n in enumerate(out.indices.flatten().tolist()):
        grad[n] += 2 * (vq.memory.detach()[n] - flat_z[p]) / z.numel()
    torch.testing.assert_close(vq.memory.grad, grad)


def test_init_from_uses_queries_and_bad_shape_errors():
    vq = _vq(n=4, d=3)
    z = torch.randn(2, 3, 5, 5)
    vq.init_from(z, torch.Generator().manual_seed(0))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (torch.cdist(vq.memory.detach(), flat).min(1).values < 1e-2).all()
    with pytest.raises(ValueError, match="feature cube"):
        vq(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="n_items"):
        VectorQuantizer(0, 3)

"""Vector quantisation: replace every feature vector by its nearest memory item.

An information bottleneck used by DMAD (and usable by any method that wants a discrete
prototype memory).  For a query cube ``z_e`` ``[B, D, H, W]`` and a memory ``z`` ``[N, D]``:

* ``z_q[b, :, h, w] = z[argmin_n ||z_e[b, :, h, w] - z_n||_2]`` — nearest item in L2;
* compression loss ``L_com = ||SG(z_e) - z_q||^2 + beta ||z_e - SG(z_q)||^2`` (means over all
  entries): the first term pulls the memory towards the queries, the second ("commitment")
  keeps the encoder near the memory;
* straight-through estimator: the forward value is ``z_q`` but the backward pass treats the
  argmin as the identity, ``z_st = z_e + SG(z_q - z_e)``, so ``d z_st / d z_e = I`` and the
  encoder receives the decoder's gradient unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Quantized(NamedTuple):
    """Output of :class:`VectorQuantizer`."""

    z_q: torch.Tensor  # straight-through quantised cube [B, D, H, W] (forward value = memory items)
    loss: torch.Tensor  # compression loss L_com (scalar)
    indices: torch.Tensor  # chosen memory item per position [B, H, W] (long)


class VectorQuantizer(nn.Module):
    """A memory of ``n_items`` vectors of size ``dim``; nearest-item quantisation with a straight-through gradient."""

    def __init__(self, n_items: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        if n_items < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer needs n_items >= 1 and dim >= 1, got n_items={n_items}, dim={dim}")
        self.beta = float(beta)
        self.memory = nn.Parameter(torch.randn(n_items, dim) / dim**0.5)

    @property
    def n_items(self) -> int:
        return self.memory.shape[0]

    def _check(self, z_e: torch.Tensor) -> None:
        if z_e.ndim != 4 or z_e.shape[1] != self.memory.shape[1]:
            raise ValueError(f"VectorQuantizer expects a feature cube [B, {self.memory.shape[1]}, H, W], "
                             f"got {tuple(z_e.shape)}; match the encoder's output channels to dim")

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index ``[B, H, W]`` of the memory item nearest (L2) to each vector of ``z_e`` ``[B, D, H, W]``."""
        self._check(z_e)
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        dist = torch.cdist(flat, self.memory.detach().to(flat.dtype))  # [B*H*W, N]
        return dist.argmin(1).view(z_e.shape[0], z_e.shape[2], z_e.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Memory items for ``indices`` ``[B, H, W]`` as a cube ``[B, D, H, W]``."""
        return self.memory[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def init_from(self, z_e: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set the memory to randomly chosen query vectors (avoids dead items at the start of training)."""
        self._check(z_e)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        pick = torch.randint(0, flat.shape[0], (self.n_items,), generator=generator)
        noise = torch.randn(self.memory.shape, generator=generator) * 1e-3
        self.memory.copy_(flat[pick.to(flat.device)].to(self.memory) + noise.to(self.memory))

    def forward(self, z_e: torch.Tensor) -> Quantized:
        indices = self.nearest(z_e)
        z_q = self.lookup(indices)
        loss = (z_e.detach() - z_q).pow(2).mean() + self.beta * (z_e - z_q.detach()).pow(2).mean()
        z_st = z_e + (z_q - z_e).detach()  # straight-through: value z_q, gradient identity w.r.t. z_e
        return Quantized(z_st, loss, indices)


__all__ = ["Quantized", "VectorQuantizer"]

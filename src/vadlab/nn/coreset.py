"""Greedy k-center coreset selection and exact nearest-neighbour search, for memory-bank methods.

PatchCore keeps a subset M_C of the N training patch features M that covers M as well as possible:

    M_C* = argmin_{M_C subset M, |M_C| = l}  max_{m in M}  min_{n in M_C} ||m - n||,

the minimax facility location (k-center) problem.  It is NP-hard; the greedy rule "add the point
farthest from the current centres" is a 2-approximation of it (Gonzalez 1985).  Distances for the
selection are computed after a Johnson-Lindenstrauss random projection psi: R^D -> R^d, which
preserves pairwise distances up to a factor 1 +- eps with d = O(log N / eps^2).

Speed without approximation.  Greedy selection keeps, for every point x, its distance
r(x) = min_c ||x - c|| to the nearest centre and which centre that is, a(x).  A new centre c' can
only lower r(x) if ||x - c'|| < r(x), and two cheap *lower bounds* on ||x - c'|| rule most points out:

- partial distances: rotate the features onto their principal axes (an orthogonal map, so every
  distance is unchanged); then sum_{i < h} (x_i - c'_i)^2 <= ||x - c'||^2 for any h, and with a
  decaying spectrum 8 of 128 coordinates already exclude ~95-99 % of the points (one N x 8 GEMV);
- the triangle inequality: ||x - c'|| >= ||c' - a(x)|| - r(x), so ||c' - a(x)|| >= 2 r(x) excludes x.

Only the survivors get their full distance.  The result is the same sequence as the plain algorithm
(up to floating-point ties), which the tests check against brute force.

Everything works on chunks so that memory stays O(N * d) for the features plus O(N) bookkeeping.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm


def random_projection(in_dim: int, out_dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss matrix ``[in_dim, out_dim]`` with entries N(0, 1 / out_dim).

    ``x @ P`` has E ||x @ P||^2 = ||x||^2, so pairwise distances are preserved in expectation.
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"projection dimensions must be positive, got {in_dim} -> {out_dim}")
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float64) / math.sqrt(out_dim)).to(dtype)


def jl_min_dim(n_points: int, eps: float) -> int:
    """Johnson-Lindenstrauss dimension 4 ln(N) / (eps^2/2 - eps^3/3) that keeps all pairs within 1 +- eps."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return int(math.ceil(4 * math.log(n_points) / (eps**2 / 2 - eps**3 / 3)))


def _sq_dist_to(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances ``||x_i - c||^2`` via the expansion ||x||^2 + ||c||^2 - 2 x.c (one GEMV)."""
    return (x_sq + c_sq - 2.0 * (x @ c)).clamp_min_(0.0)


@torch.no_grad()
def greedy_coreset(features: torch.Tensor | Sequence[torch.Tensor], n_select: int, start: int = 0,
                   projection: torch.Tensor | None = None, prune: bool = True,
                   levels: tuple[int, ...] = (8, 32), progress: bool = False) -> torch.Tensor:
    """Indices of ``n_select`` rows of ``features`` ``[N, D]`` chosen by greedy k-center (farthest point).

    The first centre is row ``start``; each next centre is the row farthest (Euclidean) from all chosen
    ones in the space of ``features @ projection`` (``[D, d]``, e.g. :func:`random_projection`; None =
    the features themselves); ties go to the lowest index.  ``features`` may be a list of chunks
    (rows numbered across them): they are projected chunk by chunk, so only the d-dimensional copy
    of all N rows is ever held besides them.

    ``prune=False`` is the textbook loop: every step updates the distance of every point (N x d work).
    ``prune=True`` gives the same sequence with far less work, using two *exact* lower bounds:

    1. partial distances: after an orthogonal rotation onto the principal axes (distances unchanged),
       ``||x - c||^2 >= sum_{i < h} (x_i - c_i)^2`` for any h.  A point whose partial distance over the
       first ``levels[0]`` coordinates already reaches its current r(x)^2 cannot move closer; survivors
       are checked again with ``levels[1]`` coordinates, and so on; only the last few get all d;
    2. the triangle inequality: if ``||c - a(x)|| >= 2 r(x)`` the point cannot move closer either.
    """
    chunks = [features] if isinstance(features, torch.Tensor) else list(features)
    if not chunks or any(c.ndim != 2 or c.shape[1] != chunks[0].shape[1] for c in chunks):
        raise ValueError(f"features must be a [N, D] matrix or a list of [n_i, D] chunks, got shapes "
                         f"{[tuple(c.shape) for c in chunks][:4]}")
    if projection is not None and (projection.ndim != 2 or projection.shape[0] != chunks[0].shape[1]):
        raise ValueError(f"projection {tuple(projection.shape)} must be [D, d] with D = {chunks[0].shape[1]}")
    n = sum(c.shape[0] for c in chunks)
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select={n_select} must be in 1..{n} (the number of feature rows)")
    if not 0 <= start < n:
        raise ValueError(f"start={start} is not a row index of the {n} features")
    dtype = chunks[0].dtype if chunks[0].is_floating_point() else torch.float32
    device = chunks[0].device

    def project(c: torch.Tensor) -> torch.Tensor:
        c = c.to(dtype)
        return c if projection is None else c @ projection.to(device=device, dtype=dtype)

    # pass 1: mean (centring changes no distance but shrinks norms, so the expansion loses fewer
    # digits) and scatter matrix, whose eigenvectors are the principal axes
    d = projection.shape[1] if projection is not None else chunks[0].shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
    for c in chunks:
        z = project(c).double()
        total += z.sum(0)
        scatter += z.T @ z
    mean = total / n
    cuts = [h for h in levels if 0 < h < d] if prune else []
    bounds = [0, *cuts, d]
    if cuts:  # orthogonal rotation onto the principal axes (largest variance first)
        _, vectors = torch.linalg.eigh(scatter - n * torch.outer(mean, mean))
        rotation = vectors.flip(1).to(dtype)
    # pass 2: centred (rotated) coordinates, stored as contiguous column blocks (fast GEMV on the first)
    blocks = [torch.empty(n, b - a, dtype=dtype, device=device) for a, b in zip(bounds[:-1], bounds[1:])]
    row = 0
    for c in chunks:
        z = project(c) - mean.to(dtype)
        for blk, a, b in zip(blocks, bounds[:-1], bounds[1:]):
            blk[row:row + len(z)] = z @ rotation[:, a:b] if cuts else z
        row += len(z)
    block_sq = [(blk * blk).sum(1) for blk in blocks]
    min_sq = torch.full((n,), float("inf"), dtype=dtype, device=device)  # r(x)^2
    assign = torch.zeros(n, dtype=torch.long, device=device)  # a(x): slot of the nearest centre
    centres = torch.empty(n_select, d, dtype=dtype, device=device)
    chosen = torch.empty(n_select, dtype=torch.long)
    idx = start
    for t in tqdm(range(n_select), desc="coreset", leave=False, disable=not progress):
        chosen[t] = idx
        c_parts = [blk[idx] for blk in blocks]
        centres[t] = torch.cat(c_parts)
        # level 0 on every point: (partial) squared distance by one GEMV
        part = torch.addmv(block_sq[0], blocks[0], c_parts[0], alpha=-2.0).add_(block_sq[0][idx])
        if len(blocks) == 1 and (t == 0 or not prune):
            part.clamp_min_(0.0)
            closer = part < min_sq
            min_sq = torch.where(closer, part, min_sq)
            assign.masked_fill_(closer, t)
        else:
            cand = (part < min_sq).nonzero().squeeze(1)
            part = part.index_select(0, cand)
            r_sq = min_sq.index_select(0, cand)
            if t > 0 and cand.numel():  # triangle test on the survivors
                centre_sq = ((centres[:t] - centres[t]) ** 2).sum(1)
                keep = (4.0 * r_sq > centre_sq.index_select(0, assign.index_select(0, cand))).nonzero().squeeze(1)
                cand, part, r_sq = cand.index_select(0, keep), part.index_select(0, keep), r_sq.index_select(0, keep)
            for blk, sq in zip(blocks[1:], block_sq[1:]):
                if not cand.numel():
                    break
                part += sq.index_select(0, cand) + sq[idx] - 2.0 * (blk.index_select(0, cand) @ blk[idx])
                keep = (part < r_sq).nonzero().squeeze(1)
                cand, part, r_sq = cand.index_select(0, keep), part.index_select(0, keep), r_sq.index_select(0, keep)
            min_sq.index_copy_(0, cand, part.clamp_min_(0.0))
            assign.index_fill_(0, cand, t)
        min_sq[idx] = 0.0
        assign[idx] = t
        if t + 1 < n_select:
            idx = int(torch.argmax(min_sq))
    return chosen


@torch.no_grad()
def covering_radius(features: torch.Tensor, centres: torch.Tensor, chunk_size: int = 4096) -> float:
    """max_m min_c ||m - c||: the k-center objective of the centre set (rows of ``centres``)."""
    dist, _ = nearest_neighbours(features, centres, k=1, chunk_size=chunk_size)
    return float(dist.max())


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                       chunk_size: int = 4096, max_elements: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows of every query row: Euclidean distances ``[Q, k]`` and indices ``[Q, k]``.

    Brute force in chunks of queries so that no more than ``max_elements`` distances exist at once (2^20:
    4 MiB of float32, which stay in cache and are reused; 2^24 was 1.5x slower on a CPU, same result).
    The search uses the fast expansion ||q||^2 + ||b||^2 - 2 q.b; the returned distances are then
    recomputed from the differences of the winning pairs, so they are accurate to float precision.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and bank {tuple(bank.shape)} must be [Q, D] and [M, D]")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must be in 1..{bank.shape[0]} (the bank size)")
    bank_sq = (bank * bank).sum(1)
    rows = max(1, min(chunk_size, max_elements // max(1, bank.shape[0])))
    dists, indices = [], []
    for q in queries.split(rows):
        d_sq = torch.addmm(bank_sq[None, :], q, bank.T, beta=1.0, alpha=-2.0)
        d_sq += (q * q).sum(1, keepdim=True)
        if k == 1:
            idx = d_sq.argmin(1, keepdim=True)
        else:
            idx = d_sq.topk(k, dim=1, largest=False).indices
        exact = (q[:, None, :] - bank[idx]).pow(2).sum(-1).sqrt()
        if k > 1:  # re-sort on the exact distances (order may flip for near ties)
            exact, order = exact.sort(1)
            idx = idx.gather(1, order)
        dists.append(exact)
        indices.append(idx)
    return torch.cat(dists), torch.cat(indices)


__all__ = ["covering_radius", "greedy_coreset", "jl_min_dim", "nearest_neighbours", "random_projection"]

"""PatchCore: exact greedy coreset, the paper's re-weighted score, defect separation, save/load, errors."""

import numpy as np
import pytest
import torch

from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.patchcore import CPU_PRESET, PatchCore, PatchCoreConfig, reweighted_score
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.coreset import greedy_coreset, jl_min_dim, nearest_neighbours, random_projection


def brute_force_greedy(points: np.ndarray, n_select: int, start: int) -> list[int]:
    """The textbook k-center greedy from the full pairwise distance matrix."""
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    chosen = [start]
    while len(chosen) < n_select:
        nearest = dist[:, chosen].min(1)
        chosen.append(int(np.argmax(nearest)))
    return chosen


@pytest.mark.parametrize("dim,levels", [(3, (8, 32)), (40, (8, 32)), (40, (2,)), (40, ())])
def test_greedy_coreset_is_the_exact_greedy_sequence(dim, levels):
    rng = np.random.default_rng(dim)
    # anisotropic clusters: a decaying spectrum, as real features have, so the pruning bounds bite
    points = rng.normal(size=(600, dim)) * np.linspace(3, 0.1, dim) + rng.normal(size=(6, dim))[rng.integers(0, 6, 600)]
    expected = brute_force_greedy(points, 60, start=17)
    x = torch.from_numpy(points)
    assert greedy_coreset(x, 60, start=17, levels=levels).tolist() == expected
    assert greedy_coreset(x, 60, start=17, prune=False).tolist() == expected


def test_greedy_coreset_float32_and_errors():
    x = torch.randn(2000, 64)
    assert torch.equal(greedy_coreset(x, 50, start=3), greedy_coreset(x, 50, start=3, prune=False))
    with pytest.raises(ValueError, match="n_select=0"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="start=2000"):
        greedy_coreset(x, 5, start=2000)
    with pytest.raises(ValueError, match=r"\[N, D\] matrix"):
        greedy_coreset(x[None], 5)
    # chunks + projection (the streaming form PatchCore uses) = the projected matrix at once
    p = random_projection(64, 16, seed=1)
    assert torch.equal(greedy_coreset(list(x.split(300)), 50, start=3, projection=p),
                       greedy_coreset(x @ p, 50, start=3, prune=False))


def test_random_projection_preserves_distances():
    x = torch.randn(200, 512, dtype=torch.float64)
    p = random_projection(512, 256, seed=0, dtype=torch.float64)
    d0, d1 = torch.pdist(x), torch.pdist(x @ p)
    ratio = d1 / d0
    assert abs(float(ratio.mean()) - 1) < 0.02 and float(ratio.std()) < 0.06
    assert jl_min_dim(10_000, 0.5) > jl_min_dim(100, 0.5)


def test_nearest_neighbours_exact():
    q, bank = torch.randn(300, 16), torch.randn(500, 16)
    d, i = nearest_neighbours(q, bank, k=3, max_elements=5000)  # several chunks
    ref = torch.cdist(q.double(), bank.double())
    rd, ri = ref.topk(3, largest=False)
    assert torch.equal(i, ri)
    torch.testing.assert_close(d.double(), rd, rtol=1e-5, atol=1e-5)


def test_reweighting_matches_equation_7():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 5))
    test = rng.normal(size=(12, 5)) * 1.5
    b = 4
    # definition, step by step, in numpy
    dist = np.sqrt(((test[:, None] - bank[None]) ** 2).sum(-1))
    worst = dist.min(1).argmax()
    m_star = dist[worst].argmin()
    s_star = dist[worst, m_star]
    nb = np.argsort(np.sqrt(((bank - bank[m_star]) ** 2).sum(-1)))[:b]  # N_b(m*), m* included
    assert nb[0] == m_star
    expected = (1 - np.exp(dist[worst, m_star]) / np.exp(dist[worst, nb]).sum()) * s_star
    got = reweighted_score(torch.from_numpy(test), torch.from_numpy(bank), num_neighbors=b)
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)
    # b = 1 degenerates to the plain maximum
    assert float(reweighted_score(torch.from_numpy(test), torch.from_numpy(bank), 1)) == pytest.approx(s_star)


def test_patchcore_separates_generated_defects_and_round_trips(synth_tensors, tmp_path):
    train, test, labels, masks = synth_tensors("brick", 40, 24, 128, 128)
    batches = list(train.split(8))
    model = PatchCore(batch_size=8).fit(batches)  # paper defaults: 10 % coreset, p = 3, b = 9
    n_patches = 40 * 16 * 16
    assert model.memory_bank.shape == (int(0.1 * n_patches), 152)
    scores, maps = model.predict(test)
    assert maps.shape == (len(test), 128, 128)
    assert image_auroc(labels.numpy(), scores.numpy()) >= 0.9
    assert pixel_auroc(masks.numpy(), maps.numpy()) >= 0.9
    # predict's image score is Eq. 7 on the image's own patch features
    x = model.embed(test[:1])
    own = reweighted_score(x[0].permute(1, 2, 0).reshape(-1, x.shape[1]), model.memory_bank, 9)
    torch.testing.assert_close(scores[0], own)
    # the same seed gives the same memory bank
    assert torch.equal(PatchCore(batch_size=8).fit(batches).memory_bank, model.memory_bank)
    # save/load round trip gives identical predictions
    again = AnomalyMethod.load(model.save(tmp_path / "patchcore.pt"))
    s2, m2 = again.predict(test[:4])
    assert torch.equal(s2, scores[:4]) and torch.equal(m2, maps[:4])


def test_patchcore_config_preset_and_errors():
    assert get_method("patchcore") is PatchCore
    cfg = PatchCoreConfig()
    assert (cfg.patch_size, cfg.coreset_ratio, cfg.projection_dim, cfg.sigma) == (3, 0.1, 128, 4.0)
    assert PatchCoreConfig.cpu_preset().coreset_ratio == CPU_PRESET["coreset_ratio"] == 0.01
    with pytest.raises(ValueError, match="coreset_ratio=0"):
        PatchCore(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="patch_size=2"):
        PatchCore(patch_size=2)
    model = PatchCore()
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(torch.rand(1, 3, 64, 64))
    model.memory_bank = torch.zeros(4, 152)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model.predict(torch.rand(1, 3, 64, 64) * 255)
    with pytest.raises(ValueError, match="no images"):
        PatchCore().fit([])

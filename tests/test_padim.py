"""PaDiM: the Gaussian baseline separates generated defects and round-trips through save/load."""

import numpy as np
import pytest
import torch

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.padim import Padim, PadimConfig
from vadlab.metrics import image_auroc, pixel_auroc
from vadlab.nn.gaussian import PositionalGaussian


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, categories=["brick"], n_train=40, n_test=24, size=128)
    return root


def test_gaussian_matches_numpy_cov_and_mahalanobis():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4, 2, 3)).astype(np.float32)
    g = PositionalGaussian()
    for chunk in np.array_split(x, 3):  # streaming over batches gives the one-pass answer
        g.update(torch.from_numpy(chunk))
    g.finalize(ridge=0.01)
    v = x[:, :, 1, 2].astype(np.float64)
    cov = np.cov(v, rowvar=False) + 0.01 * np.eye(4)
    np.testing.assert_allclose(g.mean[1, 2].numpy(), v.mean(0), rtol=1e-5)
    np.testing.assert_allclose(g.precision[1, 2].numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    q = rng.normal(size=(1, 4, 2, 3)).astype(np.float32)
    d = q[0, :, 1, 2] - v.mean(0)
    expected = np.sqrt(d @ np.linalg.inv(cov) @ d)
    np.testing.assert_allclose(g.distance(torch.from_numpy(q))[0, 1, 2].item(), expected, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 4, 256])
def test_gaussian_finalised_in_position_chunks_matches_numpy_everywhere(chunk):
    # finalize works through the 6 positions `chunk` at a time (a chunk of 4 leaves a remainder of 2);
    # every position must get its own precision, whatever the chunking
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3, 2, 3)).astype(np.float32) * rng.uniform(0.5, 2, size=(1, 3, 2, 3))
    g = PositionalGaussian()
    g.update(torch.from_numpy(x))
    g.finalize(ridge=0.01, chunk=chunk)
    assert g.precision.dtype == torch.float32 and g.precision.shape == (2, 3, 3, 3)
    for i in range(2):
        for j in range(3):
            cov = np.cov(x[:, :, i, j].astype(np.float64), rowvar=False) + 0.01 * np.eye(3)
            np.testing.assert_allclose(g.precision[i, j].numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)


def test_padim_separates_generated_defects_and_localises(brick):
    model = Padim(batch_size=8)
    model.fit(make_loader(MVTecDataset(brick, "brick", "train", 128), batch_size=8))
    test = MVTecDataset(brick, "brick", "test", 128)
    batch = next(iter(make_loader(test, batch_size=len(test))))
    scores, maps = model.predict(batch["image"])
    assert maps.shape == (len(test), 128, 128)
    assert image_auroc(batch["label"].numpy(), scores.numpy()) >= 0.9
    assert pixel_auroc(batch["mask"][:, 0].numpy(), maps.numpy()) >= 0.85
    # save/load round trip gives identical predictions
    path = model.save(brick / "padim.pt")
    again = AnomalyMethod.load(path)
    s2, m2 = again.predict(batch["image"][:4])
    assert torch.equal(s2, scores[:4]) and torch.equal(m2, maps[:4])


def test_padim_config_and_errors():
    assert get_method("padim") is Padim
    cfg = PadimConfig()
    assert (cfg.n_features, cfg.ridge, cfg.sigma) == (100, 0.01, 4.0)  # the paper's R18 setting
    with pytest.raises(ValueError, match="n_features=1000"):
        Padim(n_features=1000)
    with pytest.raises(ValueError, match="unknown hyperparameter 'n_feature'"):
        Padim(n_feature=10)
    model = Padim(n_features=8)
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="at least 2"):
        model.fit([torch.rand(1, 3, 32, 32)])

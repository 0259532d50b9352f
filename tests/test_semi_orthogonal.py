"""Semi-orthogonal embedding: W^T W = I, the embedded Gaussian, defect separation, save/load, errors."""

import numpy as np
import pytest
import torch

from vadlab.methods import AnomalyMethod, get_method
from vadlab.methods.semi_orthogonal import SemiOrthogonal, SemiOrthogonalConfig, semi_orthogonal_matrix
from vadlab.metrics import image_auroc, pixel_auroc


def test_w_is_semi_orthogonal_and_sign_fixed():
    w = semi_orthogonal_matrix(176, 100, seed=3).double()
    torch.testing.assert_close(w.T @ w, torch.eye(100, dtype=torch.float64), atol=1e-6, rtol=0)
    # the sign fix makes W the Q of a QR with a positive diagonal R: R = W^T omega has diag > 0
    omega = torch.randn(176, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = w.T @ omega
    assert bool((torch.diagonal(r) > 0).all())
    torch.testing.assert_close(torch.triu(r), r, atol=1e-5, rtol=0)  # upper triangular
    assert torch.equal(semi_orthogonal_matrix(176, 100, seed=3), semi_orthogonal_matrix(176, 100, seed=3))
    with pytest.raises(ValueError, match="1 <= k <= F"):
        semi_orthogonal_matrix(10, 11)


def test_semi_orthogonal_separates_generated_defects_and_round_trips(synth_tensors, tmp_path):
    train, test, labels, masks = synth_tensors("brick", 40, 24, 128, 128)
    model = SemiOrthogonal(batch_size=8).fit(list(train.split(8)))
    scores, maps = model.predict(test)
    assert maps.shape == (len(test), 128, 128)
    assert image_auroc(labels.numpy(), scores.numpy()) >= 0.9
    assert pixel_auroc(masks.numpy(), maps.numpy()) >= 0.9
    # the Gaussian lives in the k-dim embedded space: check one position against numpy
    emb = model.embed(train)[:, :, 5, 7].double().numpy()
    cov = np.cov(emb, rowvar=False) + 0.01 * np.eye(100)
    np.testing.assert_allclose(model.gaussian.mean[5, 7].numpy(), emb.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.gaussian.precision[5, 7].numpy(), np.linalg.inv(cov), rtol=1e-3, atol=1e-3)
    # save/load round trip gives identical predictions
    again = AnomalyMethod.load(model.save(tmp_path / "so.pt"))
    s2, m2 = again.predict(test[:4])
    assert torch.equal(s2, scores[:4]) and torch.equal(m2, maps[:4])


def test_semi_orthogonal_config_and_errors():
    assert get_method("semi_orthogonal") is SemiOrthogonal
    cfg = SemiOrthogonalConfig()
    assert (cfg.k, cfg.ridge, cfg.sigma) == (100, 0.01, 4.0)
    assert SemiOrthogonalConfig.cpu_preset() == cfg
    with pytest.raises(ValueError, match="k=500"):
        SemiOrthogonal(k=500)
    model = SemiOrthogonal()
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="no images"):
        SemiOrthogonal().fit([])

"""Diffusion maths: the closed form matches the simulated chain; DDIM with an oracle is exact."""

import math

import pytest
import torch

from vadlab.nn.diffusion import NoiseSchedule, make_betas, timestep_embedding


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_closed_form_matches_simulated_markov_chain(kind):
    """Run q(x_t | x_{t-1}) step by step from a fixed x_0; compare mean and variance with q(x_t | x_0)."""
    sched = NoiseSchedule(1000, *((1e-4, 0.02) if kind == "linear" else (0.00085, 0.012)), kind=kind)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([1.5, -0.7, 0.0], dtype=torch.float64)
    x = x0.expand(n, 3).clone()
    checks = {0: None, 9: None, 99: None, 499: None, 999: None}
    for t in range(1000):
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = sched.q_step(x, torch.full((n,), t), noise)
        if t in checks:
            checks[t] = (x.mean(0), x.var(0))
    for t, (mean, var) in checks.items():
        ab = sched.alpha_bars[t]
        expected_mean, expected_var = ab.sqrt() * x0, (1 - ab).expand(3)
        # 5 standard errors of the sample mean / variance
        se_mean = (expected_var / n).sqrt()
        se_var = expected_var * math.sqrt(2 / (n - 1))
        assert torch.all((mean - expected_mean).abs() < 5 * se_mean + 1e-12), (t, mean, expected_mean)
        assert torch.all((var - expected_var).abs() < 5 * se_var + 1e-12), (t, var, expected_var)
    # and q_sample draws from that same distribution
    xs = sched.q_sample(x0.expand(n, 3), torch.full((n,), 499),
                        torch.randn((n, 3), generator=g, dtype=torch.float64))
    ab = sched.alpha_bars[499]
    assert torch.allclose(xs.mean(0), ab.sqrt() * x0, atol=5 * ((1 - ab) / n).sqrt().item())


def test_schedule_values_and_errors():
    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.all(betas[1:] > betas[:-1])
    lin = make_betas(1000)
    assert torch.allclose(lin[1:] - lin[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    sched = NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear")
    assert math.sqrt(sched.alpha_bars[999]) == pytest.approx(0.068, abs=0.002)  # "almost pure noise"
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_betas(10, kind="cosine")
    with pytest.raises(ValueError, match="timesteps must lie in 0..999"):
        sched.q_sample(torch.zeros(1, 2), torch.tensor([1000]))
    with pytest.raises(ValueError, match="steps must lie in"):
        sched.ddim_timesteps(5, 10)


def _oracle(sched: NoiseSchedule, x0: torch.Tensor):
    """A model that returns the exact noise separating x_t from the known x_0."""
    def eps(x_t, t):
        ab = sched.alpha_bars[t].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps


@pytest.mark.parametrize("t_start,steps", [(999, 10), (600, 10), (999, 1), (250, 37)])
def test_ddim_with_oracle_epsilon_reconstructs_exactly(t_start, steps):
    sched = NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear")
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    z_t = sched.q_sample(z0, torch.full((3,), t_start), torch.randn(z0.shape, generator=g, dtype=torch.float64))
    calls = []
    oracle = _oracle(sched, z0)

    def model(x, t):
        calls.append(int(t[0]))
        return oracle(x, t)

    out = sched.ddim_sample(model, z_t, t_start, steps)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-9)
    assert len(calls) == steps and calls[0] == t_start and calls == sorted(calls, reverse=True)
    # a wrong predictor (half the true noise) must not land on z0
    wrong = sched.ddim_sample(lambda x, t: 0.5 * oracle(x, t), z_t, t_start, steps)
    assert (wrong - z0).abs().max() > 0.1


def test_ddpm_step_is_centred_on_the_posterior_mean():
    """With the oracle noise, DDPM steps scatter around the mean of q(x_{t-1} | x_t, x_0) with sd sqrt(beta_t)."""
    sched = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    t, n = 300, 4000
    x_t = sched.q_sample(x0, torch.full((2,), t), torch.randn(2, 5, generator=g, dtype=torch.float64))
    eps = _oracle(sched, x0)(x_t, torch.full((2,), t))
    ab, ab_prev, beta = sched.alpha_bars[t], sched.alpha_bars[t - 1], sched.betas[t]
    posterior_mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
    draws = torch.stack([sched.ddpm_step(x_t, t, eps, g) for _ in range(n)])
    assert torch.all((draws.mean(0) - posterior_mean).abs() < 5 * (beta / n).sqrt())
    assert torch.allclose(draws.std(0), beta.sqrt().expand(2, 5), rtol=0.1)
    # the last step (t = 0) adds no noise and, with the oracle, returns x_0 exactly
    zero = torch.zeros(2, dtype=torch.long)
    x_first = sched.q_sample(x0, zero, torch.randn(2, 5, generator=g, dtype=torch.float64))
    torch.testing.assert_close(sched.ddpm_step(x_first, 0, _oracle(sched, x0)(x_first, zero)), x0)


def test_epsilon_loss_is_zero_for_the_oracle_and_positive_otherwise():
    sched = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    assert sched.epsilon_loss(_oracle(sched, x0), x0, t, noise).item() < 1e-20
    assert sched.epsilon_loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() == pytest.approx(
        noise.pow(2).mean().item())


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 10, 999]), 32)
    assert e.shape == (3, 32)
    torch.testing.assert_close(e[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    torch.testing.assert_close(e[:, :16].pow(2) + e[:, 16:].pow(2), torch.ones(3, 16))
    assert not torch.allclose(e[1], e[2])

# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lab: one DDIM step (DiAD)
#
# **Learning goals.** After this lab you can
# - write the deterministic DDIM update from step $t$ to any earlier step $t'$, including the last step to
#   $x_0$;
# - explain why DDIM can skip steps (10 network calls instead of 1000);
# - relate the starting noise level of DiAD's reconstruction to what it can repair, in the pipeline.
#
# **Expected time:** 40 minutes (10 reading, 15 exercise, 15 open question).
#
# **Before you start:** read the forward process and sampling sections of the chapter *Diffusion*.

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_ddim_step, results_table, show_params
from vadlab.nn.diffusion import NoiseSchedule

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "font.size": 9})

# %% [markdown]
# ## 1. Recap
#
# The forward process has the closed form $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\,
# \epsilon$, with $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$ (`alpha_bars[t]`, steps indexed
# $t = 0..T-1$). Given a noise estimate $\hat\epsilon = \epsilon_\theta(x_t, t)$, DDIM ($\eta = 0$):
#
# 1. estimates the clean image, $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon) / \sqrt{\bar\alpha_t}$;
# 2. puts it back at the noise level of the target step $t' < t$ **with the same noise**,
#    $x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0 + \sqrt{1 - \bar\alpha_{t'}}\, \hat\epsilon$.
#
# Nothing in this update requires $t' = t - 1$. The last step goes to $x_0$ itself: we write `t_next = -1` for
# it, with $\bar\alpha_{-1} := 1$.
#
# ## 2. Exercise
#
# Write `ddim_step(x_t, eps, t, t_next, alpha_bars)`: `x_t` and `eps` are tensors of the same shape, `t` and
# `t_next` integers (`t_next = -1` means $x_0$), `alpha_bars` the $[T]$ tensor of $\bar\alpha$. Return
# $x_{t'}$.

# %% tags=["solution"]
def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, t_next: int, alpha_bars: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update from step t to t_next (-1: to x_0)."""
    # BEGIN SOLUTION
    ab = alpha_bars[t]
    ab_next = alpha_bars[t_next] if t_next >= 0 else torch.ones((), dtype=alpha_bars.dtype)
    x0_hat = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    return ab_next.sqrt() * x0_hat + (1 - ab_next).sqrt() * eps
    # END SOLUTION


# %%
ok = check_ddim_step(ddim_step)

# %% [markdown]
# ## 3. Ten steps instead of a thousand
#
# For data made of two points, $x_0 \in \{-1, +1\}$ with equal probability, the best noise predictor is known
# in closed form: $\mathbb E[x_0 \mid x_t] = \tanh\!\big(\sqrt{\bar\alpha_t}\, x_t / (1 - \bar\alpha_t)\big)$,
# and $\epsilon^*(x_t, t) = (x_t - \sqrt{\bar\alpha_t}\, \mathbb E[x_0 \mid x_t]) / \sqrt{1 - \bar\alpha_t}$.
# With this "perfect network", DDIM brings samples from pure noise onto the data in a few steps; the
# samples that decide late (near $x = 0$) need more steps.

# %%
sched = NoiseSchedule(1000, kind="linear")
ab = sched.alpha_bars


def eps_star(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = ab[t].view(-1, 1).to(x.dtype)
    x0_mean = torch.tanh(a.sqrt() * x / (1 - a))
    return (x - a.sqrt() * x0_mean) / (1 - a).sqrt()


x_T = torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
ts = sched.ddim_timesteps(999, 10)
path = [x_T]
for i, t in enumerate(ts):
    t_next = ts[i + 1] if i + 1 < len(ts) else -1
    path.append(sched.ddim_step(path[-1], t, t_next, eps_star(path[-1], torch.full((200,), t))))
x_0 = path[-1]
npt.assert_allclose(x_0, sched.ddim_sample(eps_star, x_T, steps=10))  # the package's sampler, same steps

plt.figure(figsize=(6, 3))
steps = list(range(len(path)))
plt.plot(steps, torch.cat(path, 1)[:60].T, lw=0.6, c="steelblue")
plt.xticks(steps, [str(t) for t in ts] + ["x0"], fontsize=7)
plt.xlabel("timestep")
plt.ylabel("x")
plt.title("10 DDIM steps from noise to {-1, +1}")
plt.tight_layout()
plt.show()
landed_10 = float(((x_0.abs() - 1).abs() < 0.05).double().mean())
landed_50 = float(((sched.ddim_sample(eps_star, x_T, steps=50).abs() - 1).abs() < 0.05).double().mean())
print(f"within 0.05 of -1 or +1: {landed_10:.0%} after 10 steps, {landed_50:.0%} after 50 steps")
assert 0.8 < landed_10 <= landed_50 and landed_50 > 0.99
if ok:
    mine = x_T
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        mine = ddim_step(mine, eps_star(mine, torch.full((200,), t)), t, t_next, ab)
    npt.assert_allclose(mine, x_0, atol=1e-10)

# %% [markdown]
# ## 4. Open question: how much noise before the reconstruction?
#
# DiAD adds noise to a test image's latent up to step `noise_step`, then denoises it back with `ddim_steps` DDIM
# steps, guided by the image's features; the anomaly map compares the image with its reconstruction. The CPU
# preset starts at `noise_step: 900` (the paper at 999). The pipeline runs DiAD in the multi-class protocol
# (`unified_methods`; stage `unified@diad`).
#
# 1. Predict: with little noise (`noise_step: 300`), does the reconstruction keep the defects? What happens to
#    image AUROC?
# 2. In `params.yaml` change the DiAD line to `diad: {image_size: 64, preset: cpu, set: {noise_step: 300}}`.
# 3. From the repository root run `dvc repro` (the DiAD run and the tables rerun) and `dvc metrics diff`.
# 4. Rerun the cell below (it lists the tables with DiAD rows).
#
# **Question.** Explain the change with section 3: how much of $x_0$ survives in $x_t$ at $t = 300$ versus
# $t = 900$ (compute $\sqrt{\bar\alpha_t}$ for DiAD's scaled-linear schedule), and why a defect that survives
# the noise also survives the reconstruction. (Restore the line afterwards.)

# %%
show_params("diad")
results_table("diad")

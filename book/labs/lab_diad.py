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
# # Lab: one DDIM step and the semantic guidance (DiAD)
#
# **Learning goals.** After this lab you can
# - write the deterministic DDIM update from step $t$ to any earlier step $t'$, including the last step to
#   $x_0$;
# - explain why DDIM can skip steps (10 network calls instead of 1000);
# - write DiAD's guided noise prediction: the semantic-guidance network's residuals added to the denoiser's
#   middle block and first decoder skips, and show that without them the reconstruction drifts away from the
#   input while with them it stays;
# - relate the starting noise level of DiAD's reconstruction to what it can repair, in the pipeline.
#
# **Expected time:** 60 minutes (15 reading, 15 + 15 exercises, 15 open question).
#
# **Before you start:** read the forward process and sampling sections of the chapter *Diffusion*, and its
# section "The semantic-guidance network".

# %%
import matplotlib.pyplot as plt
import numpy.testing as npt
import torch

from vadlab.labs import check_ddim_step, check_guided_eps, reference, results_table, show_params
from vadlab.methods.diad import Denoiser, DiADConfig, SemanticGuidance
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
# ## 4. Recap: how the input image guides the denoiser
#
# From $t = 900$ little of the input survives in $z_t$ ($\sqrt{\bar\alpha_{900}} = 0.12$ on DiAD's scaled-linear
# schedule), so a plain denoiser reconstructs *some* normal image, not *this* one. DiAD gives it the input $x$ itself through the
# **semantic-guidance (SG) network**, a trainable copy of the denoiser's encoder half (as in ControlNet):
#
# 1. the image passes a conv-SiLU stack $\mathcal C$ down to the latent's size and is added to the noisy latent
#    after the copy's first block, $z_t + \mathcal C(x)$;
# 2. the copy's middle-block output and the outputs of its last encoder stage (fused by SFF) leave through
#    zero-initialised convolutions: the `Guidance`, with `middle` (shaped like the denoiser's middle-block output)
#    and `skips` (one residual per skip feature of the denoiser's *first* decoder blocks, deepest first);
# 3. the denoiser adds them (eq. 7 of the paper): `middle` to its own middle-block output, `skips[i]` to the skip
#    feature that decoder block $i$ concatenates with $h$.
#
# At initialisation the zero convolutions make every residual 0: the guided denoiser starts as the plain one.
#
# ## 5. Exercise: the guided noise prediction
#
# Write `guided_eps(denoiser, z_t, t, guidance)` for the package's `Denoiser` (its U-Net is given in parts):
#
# - `h, hs, emb = denoiser.encode(z_t, t)`: the middle-block output $h$, the list of the encoder's skip features
#   (in encoder order: the last one is the deepest) and the timestep embedding;
# - `denoiser.decoder`: the list of decoder blocks; block $i$ takes `torch.cat([h, skip], dim=1)` and `emb`,
#   where `skip` is the next skip feature popped from the end of `hs`, and returns the new $h$;
# - `denoiser.out(h)`: the noise prediction $\hat\epsilon$.
#
# Add the guidance as in step 3 (`guidance=None`: the plain denoiser) and return $\hat\epsilon$.

# %% tags=["solution"]
def guided_eps(denoiser, z_t: torch.Tensor, t: torch.Tensor, guidance) -> torch.Tensor:
    """DiAD's noise prediction eps(z_t, t) with the SG network's residuals (guidance=None: unguided)."""
    # BEGIN SOLUTION
    h, hs, emb = denoiser.encode(z_t, t)
    hs = list(hs)
    if guidance is not None:
        h = h + guidance.middle
    for i, block in enumerate(denoiser.decoder):
        skip = hs.pop()
        if guidance is not None and i < len(guidance.skips):
            skip = skip + guidance.skips[i]
        h = block(torch.cat([h, skip], dim=1), emb)
    return denoiser.out(h)
    # END SOLUTION


# %%
ok_guided = check_guided_eps(guided_eps)

# %% [markdown]
# ## 6. With and without guidance
#
# A toy in the multi-class spirit of DiAD, small enough to train in seconds: $8 \times 8$ images, dark with a
# bright $3 \times 3$ square at a random place (every place is normal). The latent is the image itself (no
# autoencoder). Two small models of the package's networks are trained for 100 steps with the epsilon loss on
# DiAD's schedule: a plain `Denoiser`, and a `Denoiser` with a `SemanticGuidance` network trained together
# (the package trains them in stages, after a pretrained denoiser; there is none here). Both noise 32 held-out
# images to $t = 800$ and denoise them with 10 DDIM steps, using your `guided_eps` (the package's until your
# check passes). Does the reconstruction keep the input's square where it was? (About 6 s.)

# %%
eps_fn = guided_eps if ok_guided else reference("guided_eps")  # yours once the check passes
S = 8


def squares(n: int, seed: int) -> torch.Tensor:
    """n images [-1, 1] of size 8 x 8, dark, with a bright 3 x 3 square at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 3, S, S)
    for i, (r, c) in enumerate(torch.randint(0, S - 2, (n, 2), generator=g).tolist()):
        x[i, :, r:r + 3, c:c + 3] = 1.0
    return x


def square_at(x: torch.Tensor) -> torch.Tensor:
    """Index of the brightest 3 x 3 window of each image."""
    return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 3, stride=1).flatten(1).argmax(1)


train_sq, test_sq = squares(256, 0), squares(32, 1)
toy = DiADConfig(latent_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), num_heads=1, hint_channels=(16,))
toy_sched = NoiseSchedule(toy.num_timesteps, toy.beta_start, toy.beta_end, toy.schedule)  # DiAD's scaled-linear


def fit_toy(guided: bool, steps: int = 100):
    torch.manual_seed(0)
    denoiser = Denoiser(toy)
    sg = SemanticGuidance(toy, factor=1) if guided else None  # factor 1: the latent has the image's size
    params = list(denoiser.parameters()) + (list(sg.parameters()) if guided else [])
    opt = torch.optim.Adam(params, lr=6e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = train_sq[torch.randint(len(train_sq), (16,), generator=gen)]
        loss = toy_sched.epsilon_loss(lambda z, t: eps_fn(denoiser, z, t, sg(z, t, x) if guided else None), x,
                                      generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return denoiser.eval(), sg


t_start = 800
z_t = toy_sched.q_sample(test_sq, torch.full((len(test_sq),), t_start),
                         torch.randn(test_sq.shape, generator=torch.Generator().manual_seed(2)))
recs, drift = {}, {}
for guided in (False, True):
    denoiser, sg = fit_toy(guided)
    with torch.no_grad():
        rec = toy_sched.ddim_sample(lambda z, t: eps_fn(denoiser, z, t, sg(z, t, test_sq) if guided else None),
                                    z_t, t_start, 10)
    name = "with SG" if guided else "without SG"
    recs[name] = rec
    drift[name] = {"pixel MSE to the input": (rec - test_sq).pow(2).mean().item(),
                   "square kept in place": (square_at(rec) == square_at(test_sq)).float().mean().item()}
    print(f"{name:10s}  pixel MSE to the input {drift[name]['pixel MSE to the input']:.3f}   "
          f"square kept in place {drift[name]['square kept in place']:.0%}")
assert drift["with SG"]["pixel MSE to the input"] < 0.6 * drift["without SG"]["pixel MSE to the input"]
assert drift["with SG"]["square kept in place"] > 0.9 > 0.6 > drift["without SG"]["square kept in place"]

fig, ax = plt.subplots(3, 8, figsize=(8, 3.3))
for r, (name, ims) in enumerate((("input", test_sq), ("without SG", recs["without SG"]), ("with SG", recs["with SG"]))):
    for c in range(8):
        ax[r, c].imshow(((ims[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
        ax[r, c].set_xticks([])
        ax[r, c].set_yticks([])
    ax[r, 0].set_ylabel(name, fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The plain denoiser draws *a* normal image, a square somewhere, because $z_{800}$ says little about where it
# was ($\sqrt{\bar\alpha_{800}} = 0.19$); the guided one puts it back in place, because the SG network hands it
# the input. Rerun with
# `t_start = 300`: does the plain denoiser still drift? Relate your answer to $\sqrt{\bar\alpha_{300}}$ and to
# the open question below.
#
# ## 7. Open question: how much noise before the reconstruction?
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

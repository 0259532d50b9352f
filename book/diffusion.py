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
# # Diffusion for anomaly detection: DiAD
#
# Reconstruction-based detectors train a generator on normal images only and hope that, shown a
# defective image, it returns the *normal* version of it; the difference localises the defect.
# Autoencoders reconstruct too faithfully (they copy the defect) or too blurrily (everything differs).
# Diffusion models {cite:p}`ho2020ddpm` are much stronger generators, and **DiAD** {cite:p}`he2024diad`
# turns one into a multi-class anomaly detector: *one* model for all categories (the "unified" setting of
# UniAD {cite:p}`you2022uniad`).
#
# This chapter builds the pieces from the ground up and checks each numerically:
#
# 1. the forward (noising) process and its closed form;
# 2. noise prediction and the DDPM sampler;
# 3. DDIM, a deterministic sampler that needs 10 steps instead of 1000;
# 4. why plain diffusion loses the class and latent diffusion loses the semantics of the input
#    (the paper's figure 1), and how DiAD's semantic-guidance network fixes it;
# 5. the anomaly map and score.
#
# Everything imported below is the package's code (`vadlab.nn.diffusion`, `vadlab.methods.diad`).

# %%
import matplotlib.pyplot as plt
import numpy as np
import numpy.testing as npt
import torch

from vadlab.nn.diffusion import NoiseSchedule
from vadlab.visualize import CMAP, schematic

plt.rcParams.update({"figure.dpi": 90, "font.size": 9})
torch.set_num_threads(1)

# %% [markdown]
# ## At a glance
#
# DiAD reconstructs the test image with a latent diffusion model that is steered by the image itself, then
# compares input and reconstruction in the features of a frozen pretrained network.

# %%
schematic({
    "x": (0, 0, "image $x$", "data"),
    "enc": (1, 0, "autoencoder\nencoder $E$", "trained"),
    "noise": (2, 0, "noise the latent\nto step $t$", "data"),
    "unet": (3, 0, "latent denoiser\n(DDIM, 10 steps)", "trained"),
    "sg": (3, 1, "semantic guidance (SG)\nnetwork, input: $x$", "trained"),
    "dec": (4, 0, "decoder $D$:\nreconstruction $\\hat x$", "trained"),
    "map": (4, 1, "$1 - \\cos$ of frozen CNN\nfeatures of $x$, $\\hat x$: map", "score"),
}, [("x", "enc"), ("enc", "noise", "$z$"), ("noise", "unet", "$z_t$"), ("sg", "unet"), ("unet", "dec"),
    ("dec", "map")], title="DiAD")
plt.show()

# %% [markdown]
# ## 1. The forward process and its closed form
#
# A diffusion model destroys data $x_0$ by a Markov chain that adds a little Gaussian noise at each
# of $T = 1000$ steps, with a fixed **variance schedule** $\beta_1, \dots, \beta_T$:
#
# $$q(x_t \mid x_{t-1}) = \mathcal N\big(\sqrt{1-\beta_t}\, x_{t-1},\ \beta_t I\big),
#   \qquad\text{i.e.}\qquad x_t = \sqrt{\alpha_t}\, x_{t-1} + \sqrt{1-\alpha_t}\, \varepsilon_t,\quad \alpha_t = 1 - \beta_t .$$
#
# The factor $\sqrt{1-\beta_t}$ keeps the variance bounded: if $x_{t-1}$ has unit variance, so does $x_t$.
# We never need to run the chain, because a sum of independent Gaussians is Gaussian. Suppose
# $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\, x_0 + \sqrt{1-\bar\alpha_{t-1}}\, \bar\varepsilon$ with
# $\bar\alpha_{t} = \prod_{s \le t} \alpha_s$. Then
#
# $$x_t = \sqrt{\alpha_t \bar\alpha_{t-1}}\, x_0
#        + \underbrace{\sqrt{\alpha_t(1-\bar\alpha_{t-1})}\,\bar\varepsilon + \sqrt{1-\alpha_t}\,\varepsilon_t}_{
#          \text{variance } \alpha_t - \bar\alpha_t + 1 - \alpha_t \;=\; 1 - \bar\alpha_t},$$
#
# so by induction (the paper's eq. 1)
#
# $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1-\bar\alpha_t) I\big),
#   \qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1-\bar\alpha_t}\, \varepsilon .$$
#
# DiAD inherits Stable Diffusion's schedule: $\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to
# $\sqrt{0.012}$ ("scaled linear"); DDPM's original one is $\beta_t$ linear from $10^{-4}$ to $0.02$.
# (In code steps are indexed $t = 0, \dots, 999$.) Let us **simulate the chain** and compare.

# %%
sd = NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear")
ddpm = NoiseSchedule(1000, 1e-4, 0.02, "linear")
g = torch.Generator().manual_seed(0)
n, x0 = 20000, torch.tensor([2.0, -1.0], dtype=torch.float64)
x = x0.expand(n, 2).clone()
checkpoints, stats = (49, 199, 499, 999), {}
for t in range(1000):
    x = sd.q_step(x, torch.full((n,), t), torch.randn(x.shape, generator=g, dtype=torch.float64))
    if t in checkpoints:
        stats[t] = (x.mean(0), x.var(0))
for t, (mean, var) in stats.items():
    ab = sd.alpha_bars[t]
    print(f"t={t:4d}  simulated mean {mean.numpy().round(3)}  closed form {(ab.sqrt() * x0).numpy().round(3)}"
          f"   simulated var {var.numpy().round(3)}  closed form {float(1 - ab):.3f}")
    npt.assert_allclose(mean.numpy(), (ab.sqrt() * x0).numpy(), atol=5 * float((1 - ab) / n) ** 0.5)
    npt.assert_allclose(var.numpy(), float(1 - ab), rtol=5 * (2 / n) ** 0.5)

# %%
fig, ax = plt.subplots(1, 2, figsize=(9, 2.8))
steps = np.arange(1000)
for sched, name in ((sd, "scaled linear (SD, DiAD)"), (ddpm, "linear (DDPM)")):
    ax[0].plot(steps, sched.betas.numpy(), label=name)
    ax[1].plot(steps, sched.alpha_bars.sqrt().numpy(), label=name)
ax[0].set(title=r"$\beta_t$", xlabel="t")
ax[1].set(title=r"signal left: $\sqrt{\bar\alpha_t}$", xlabel="t")
ax[1].legend()
plt.tight_layout()
plt.show()
print(f"sqrt(alpha_bar) at t = 999: scaled linear {sd.alpha_bars[999].sqrt():.3f}, "
      f"linear {ddpm.alpha_bars[999].sqrt():.4f}")

# %% [markdown]
# At DiAD's starting step $t = 999$ about 7 % of the signal amplitude is left (SD schedule): the
# input is almost, but not quite, pure noise.
#
# ## 2. Predicting the noise, and the DDPM sampler
#
# To go back we need $q(x_{t-1} \mid x_t)$, which depends on the unknown data distribution. Given
# $x_0$ it is Gaussian (Bayes' rule on two Gaussians):
#
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal N\big(\tilde\mu_t, \tilde\beta_t I\big),\quad
#   \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\, x_0 + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\, x_t ,
#   \quad \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t .$$
#
# {cite:t}`ho2020ddpm` write $x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ and let a
# network $\varepsilon_\theta(x_t, t)$ predict the noise. Substituting turns $\tilde\mu_t$ into the
# paper's eq. 2,
#
# $$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{1-\alpha_t}{\sqrt{1-\bar\alpha_t}}\,\varepsilon_\theta(x_t, t)\Big) + \sigma_t \varepsilon' ,\qquad \varepsilon' \sim \mathcal N(0, I),$$
#
# and the training objective is plain regression of the noise (eq. 3):
# $\min_\theta \mathbb E_{x_0, \varepsilon, t}\,\lVert \varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t)\rVert^2$.
# We check the substitution numerically: with the true noise, the DDPM step (we use $\sigma_t^2=\beta_t$)
# scatters around $\tilde\mu_t$.

# %%
t = 300
x0 = torch.randn(4, generator=g, dtype=torch.float64)
xt = ddpm.q_sample(x0, torch.full((4,), t), torch.randn(4, generator=g, dtype=torch.float64))
ab, ab_prev, beta = ddpm.alpha_bars[t], ddpm.alpha_bars[t - 1], ddpm.betas[t]
true_eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
mu_tilde = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xt
draws = torch.stack([ddpm.ddpm_step(xt, t, true_eps, g) for _ in range(20000)])
npt.assert_allclose(draws.mean(0).numpy(), mu_tilde.numpy(), atol=5 * float(beta / 20000) ** 0.5)
npt.assert_allclose(draws.std(0).numpy(), float(beta.sqrt()), rtol=0.03)
print("DDPM step mean == posterior mean:", draws.mean(0).numpy().round(4), mu_tilde.numpy().round(4))

# %% [markdown]
# ## 3. DDIM: the same marginals, deterministically, in 10 steps
#
# {cite:t}`song2021ddim` noticed that the training loss only involves the marginals $q(x_t \mid x_0)$,
# so any process with those marginals can use the same network. Their choice with $\eta = 0$ is
# deterministic: predict $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta)/\sqrt{\bar\alpha_t}$,
# then re-noise it to the *next* step $t' < t$ with the *same* noise:
#
# $$x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\varepsilon_\theta(x_t, t).$$
#
# Since nothing requires $t' = t-1$, it can jump: DiAD uses 10 steps (its table 10: 1 step gives
# 66.1 image AUROC, 5 steps 96.4, 10 steps 97.2, 200 steps 96.9). Two checks:
#
# - with a model that returns the *true* noise, DDIM lands exactly on $x_0$, whatever the number of steps;
# - on a 1-D data distribution whose optimal noise predictor is known in closed form, DDPM with 1000
#   stochastic steps and DDIM with 10 deterministic steps produce the same distribution.
#
# For a mixture $x_0 \sim \sum_k \pi_k \mathcal N(\mu_k, s^2)$ the noisy marginal is again a mixture,
# $p_t = \sum_k \pi_k \mathcal N(\sqrt{\bar\alpha_t}\mu_k,\ \bar\alpha_t s^2 + 1-\bar\alpha_t)$, and the
# minimiser of the noise loss is $\varepsilon^\star(x,t) = -\sqrt{1-\bar\alpha_t}\;\nabla_x \log p_t(x)$
# (Tweedie's formula) — a perfectly trained network.

# %%
z0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
zt = sd.q_sample(z0, torch.full((3,), 999), torch.randn(z0.shape, generator=g, dtype=torch.float64))


def oracle(x, t):
    a = sd.alpha_bars[t].view(-1, 1, 1, 1)
    return (x - a.sqrt() * z0) / (1 - a).sqrt()


npt.assert_allclose(sd.ddim_sample(oracle, zt, 999, 10).numpy(), z0.numpy(), atol=1e-9)
print("DDIM (10 steps) with the true noise recovers x0 exactly; timesteps:", sd.ddim_timesteps(999, 10))

PI, MU, S = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.3


def mixture_eps(x, t, sched=sd):
    """Optimal noise prediction for the 1-D mixture (Tweedie): -sqrt(1 - abar) * d/dx log p_t(x)."""
    a = sched.alpha_bars[t].view(-1, 1)
    var = a * S**2 + 1 - a
    logw = torch.log(PI) - 0.5 * (x.view(-1, 1) - a.sqrt() * MU) ** 2 / var
    w = torch.softmax(logw, dim=1)
    score = (w * (-(x.view(-1, 1) - a.sqrt() * MU) / var)).sum(1)
    return (-(1 - a.view(-1)).sqrt() * score).view_as(x)


start = torch.randn(20000, generator=g, dtype=torch.float64)  # x_999 ~ N(0, 1)
out_ddpm = sd.ddpm_sample(mixture_eps, start, 999, generator=g)
out_ddim = sd.ddim_sample(mixture_eps, start, 999, 10)
for name, out in (("DDPM 1000 steps", out_ddpm), ("DDIM 10 steps", out_ddim)):
    right = (out > 0).double().mean().item()
    print(f"{name}: weight of the right mode {right:.3f} (data 0.700), "
          f"mode means {out[out < 0].mean():.2f} / {out[out > 0].mean():.2f} (data -2 / 2)")
    assert abs(right - 0.7) < 0.03
    assert abs(out[out > 0].mean().item() - 2.0) < 0.1 and abs(out[out < 0].mean().item() + 2.0) < 0.1

fig, ax = plt.subplots(figsize=(6, 2.4))
grid = np.linspace(-3.5, 3.5, 300)
dens = sum(p * np.exp(-0.5 * ((grid - m) / S) ** 2) / (S * np.sqrt(2 * np.pi)) for p, m in zip(PI.numpy(), MU.numpy()))
ax.plot(grid, dens, "k", label="data density")
ax.hist(out_ddpm.numpy(), bins=120, density=True, alpha=0.5, label="DDPM, 1000 steps")
ax.hist(out_ddim.numpy(), bins=120, density=True, alpha=0.5, label="DDIM, 10 steps")
ax.legend()
ax.set(title="same marginals, 100x fewer network calls")
plt.show()

# %% [markdown]
# ## 4. Why plain diffusion loses the class, and latent diffusion the semantics
#
# A reconstruction-based detector noises the test image to some step $t$ and denoises it. The
# trade-off is set by $t$: small $t$ keeps the defect (there is too little noise to hide it), large
# $t$ erases the defect — and everything else. The 1-D mixture shows the paper's figure 1(a)
# argument exactly: think of the two modes as two *categories* of a multi-class training set. Start
# from a sample of the left category, noise it to step $t$, denoise with the optimal model: how often
# do we come back in the *other* category?

# %%
ts = [50, 200, 400, 600, 800, 999]
switch = []
left = torch.full((20000,), -2.0, dtype=torch.float64)
for t in ts:
    noisy = sd.q_sample(left, torch.full((20000,), t), torch.randn(20000, generator=g, dtype=torch.float64))
    switch.append((sd.ddim_sample(mixture_eps, noisy, t, 10) > 0).double().mean().item())
print(dict(zip(ts, np.round(switch, 3))))
assert switch[0] < 0.01 and switch[-1] > 0.3
fig, ax = plt.subplots(figsize=(5, 2.4))
ax.plot(ts, switch, "o-")
ax.set(xlabel="noising step t", ylabel="P(reconstruction changes category)", title="DDPM loses the class")
plt.show()

# %% [markdown]
# At $t = 999$ the reconstruction forgets where it came from: it is a fresh sample of the *training
# mixture*, in the wrong category about as often as that category's share of the data. DiAD needs a
# large $t$ (its figure 6: performance falls sharply below 600 steps, because large defects are not
# erased), so it must give the denoiser the missing information another way.
#
# **Latent diffusion** (LDM, {cite:t}`rombach2022ldm`) runs the same process on the latent
# $z = \mathcal E(x)$ of a pretrained autoencoder, 8x smaller per side, which makes the U-Net
# affordable, and conditions it on a class or text embedding $c$ through cross-attention (eq. 4).
# A class label fixes the category but not the *instance*: the screw's orientation, the texture's
# exact pattern. The reconstruction is a plausible normal image of the right class that does not
# line up with the input, and the pixel/feature comparison lights up everywhere (figure 1(b)).
#
# ### The semantic-guidance network
#
# DiAD keeps the input image as the condition. Its **SG network** is a trainable copy of the
# denoiser's encoder half, in the manner of ControlNet {cite:p}`zhang2023controlnet`. The image $x_0$ passes a stack of conv-SiLU layers
# $\mathcal C$ down to the latent resolution and is added to the noisy latent; the copy's middle
# block and its last encoder stage (SGEB4) feed the denoiser's middle block and first decoder blocks
# (eq. 7):
#
# $$\mathcal G = \mathcal D_{SD}\Big(\mathcal M_{SD}\big(\mathcal E_{SD}(z_t)\big) + \mathcal M_{SG}\big(\mathcal E_{SG}(z_t + \mathcal C(x_0))\big)\Big)
#   + \mathcal D_{SG_j}\Big(\mathcal M_{SG}\big(\mathcal E_{SG}(z_t + \mathcal C(x_0))\big)\Big),$$
#
# where $\mathcal E_{SD}, \mathcal M_{SD}, \mathcal D_{SD}$ are the denoiser's encoder blocks, middle block
# and decoder blocks, $\mathcal E_{SG}, \mathcal M_{SG}$ the SG network's copies of the first two, and
# $\mathcal D_{SG_j}$ the SG decoder blocks whose outputs are added to the denoiser's $j$-th decoder block.
# The first term is the denoiser with the SG middle block added to its own; the second adds the SG
# encoder's skip features to the decoder. (The paper's typeset equation writes $\mathcal E_{SD}$ inside
# the SG branch and $z$ for the noisy latent; its text defines that branch as the SG encoder applied to
# $z_t + \mathcal C(x_0)$, which is what is written here.)
#
# Every connection goes through a **zero-initialised** 1x1 convolution, so at the start of training
# the guided denoiser *is* the pretrained one (we check this in the tests) and the guidance grows
# from zero. The **SFF block** adds, to each output $P_i$ of the lowest-scale stage SGEB4, the
# fused outputs $H_j$ of the stage above, $Q_i = P_i + \sum_j \mathcal F(H_j)$, with $\mathcal F$ a
# stride-2 3x3 convolution, InstanceNorm and SiLU (eq. 8): instance rather than batch normalisation
# because a multi-class batch mixes very different statistics (table 7 ablates BN+ReLU against
# IN+SiLU). The paper's ablation (table 7, MVTec AD, image/pixel AUROC): SD alone (= LDM) 79.3 / 89.5;
# + middle-block guidance 95.1 / 91.1; the full DiAD 97.2 / 96.8.
#
# ### A small experiment
#
# We train a very small DiAD of `vadlab` for a minute or two on two categories at once — a texture
# (`brick`) and an object (`screw`) — in its three stages: autoencoder, plain latent denoiser (the
# stand-in for pretrained Stable Diffusion), then SG. From the same stage-2 checkpoint we also
# continue training the plain denoiser for as many steps: the LDM row of the ablation (with no
# class condition, i.e. unconditional; one model for both categories).
#
# Both models denoise from $t = 900$ rather than the paper's 999: after so little training the
# noise prediction at $t = 999$ is too inaccurate (an error $\delta$ in $\varepsilon$ becomes
# $\sqrt{1-\bar\alpha_t}/\sqrt{\bar\alpha_t}\,\delta \approx 14.6\,\delta$ in $\hat x_0$ there), and on
# held-out normal *training* images $t = 900$ is where the guided model reconstructs as well as the
# autoencoder while the unguided one cannot; the small-CPU preset of the pipeline uses it too.

# %%
import tempfile
from pathlib import Path

from vadlab.data import MVTecDataset, generate, make_loader
from vadlab.methods.diad import CPU_PRESET, DiAD, DiADConfig, masked_errors, parameter_counts

SIZE = 48
root = Path(tempfile.mkdtemp()) / "synth"
generate(root, seed=0, categories=["brick", "screw"], n_train=60, n_test=8, size=SIZE)
train = torch.cat([next(iter(make_loader(MVTecDataset(root, c, "train", SIZE), batch_size=60))) ["image"]
                   for c in ("brick", "screw")])
small = dict(ae_channels=8, ae_channel_mult=(1, 2, 2), ae_res_blocks=1, model_channels=16, channel_mult=(1, 2),
             num_res_blocks=1, attention_resolutions=(2,), num_heads=2, hint_channels=(8, 16, 16),
             ae_steps=250, ldm_steps=250, sg_steps=800, train_batch_size=8, noise_step=900)
guided = DiAD(**small)
gen = torch.Generator().manual_seed(0)
ae_loss = guided.fit_autoencoder(train, gen)
ldm_loss = guided.fit_denoiser(train, gen)
plain = DiAD(**small, use_sg=False)
plain.load_state_dict({k: v for k, v in guided.state_dict().items() if not k.startswith("sg.")},
                      strict=False)  # same autoencoder and stage-2 denoiser
gen_plain = torch.Generator().manual_seed(1)
sg_loss = guided.fit_guidance(train, gen)
plain_loss = plain.fit_guidance(train, gen_plain)
print("final losses: autoencoder %.3f, denoiser %.3f, guided %.3f, plain %.3f"
      % tuple(np.mean(l[-25:]) for l in (ae_loss, ldm_loss, sg_loss, plain_loss)))
print("parameters:", parameter_counts(guided.config))

# %%
test = {c: next(iter(make_loader(MVTecDataset(root, c, "test", SIZE), batch_size=8))) for c in ("brick", "screw")}
images = torch.cat([torch.stack([b["image"][b["label"] == 0][0], b["image"][b["label"] == 1][0]]) for b in test.values()])
masks = torch.cat([torch.stack([b["mask"][b["label"] == 0][0], b["mask"][b["label"] == 1][0]]) for b in test.values()])
rec_ae = guided.autoencode(images)
rec_plain = plain.reconstruct(images)
rec_guided = guided.reconstruct(images)
_, maps = guided.predict(images)
rows = [("input", images), ("autoencoder only", rec_ae), ("LDM (no SG)", rec_plain), ("DiAD (with SG)", rec_guided)]
fig, ax = plt.subplots(6, 4, figsize=(7, 10.5))
for r, (name, ims) in enumerate(rows):
    for c in range(4):
        ax[r, c].imshow(ims[c].permute(1, 2, 0).numpy())
    ax[r, 0].set_ylabel(name)
lo, hi = float(maps.min()), float(maps.max())
for c in range(4):
    shown = ax[4, c].imshow(maps[c].numpy(), cmap=CMAP, vmin=lo, vmax=hi)
    ax[5, c].imshow(masks[c, 0].numpy(), cmap="gray")
ax[4, 0].set_ylabel("DiAD map")
fig.colorbar(shown, ax=ax[4, :].tolist(), fraction=0.02, pad=0.01)
ax[5, 0].set_ylabel("defect mask")
for a in ax.flat:
    a.set_xticks([])
    a.set_yticks([])
for c, title in enumerate(["brick, normal", "brick, defect", "screw, normal", "screw, defect"]):
    ax[0, c].set_title(title)
plt.tight_layout()
plt.show()

# %% [markdown]
# Does the reconstruction keep the input's category and layout? We measure, on all test images of
# both categories, (a) the pixel error between input and reconstruction and (b) whether the
# reconstruction's nearest training image belongs to the input's category, at the paper's
# $t = 999$ and at our $t = 900$.

# %%
all_test = torch.cat([b["image"] for b in test.values()])
all_cat = torch.tensor([0] * len(test["brick"]["image"]) + [1] * len(test["screw"]["image"]))
train_cat = torch.tensor([0] * 60 + [1] * 60)


def category_kept(recon):
    d = torch.cdist(recon.flatten(1), train.flatten(1))
    return (train_cat[d.argmin(1)] == all_cat).double().mean().item()


summary = {}
for t_start in (999, 900):
    for name, model in (("LDM (no SG)", plain), ("DiAD (SG)", guided)):
        rec = model.reconstruct(all_test, noise_step=t_start)
        summary[name, t_start] = ((rec - all_test).pow(2).mean().item(), category_kept(rec))
        print(f"t={t_start}  {name:12s}  pixel MSE {summary[name, t_start][0]:.4f}   "
              f"category kept {summary[name, t_start][1]:.2f}")
assert summary["DiAD (SG)", 900][0] < summary["LDM (no SG)", 900][0]
assert summary["DiAD (SG)", 900][1] >= summary["LDM (no SG)", 900][1]

# %% [markdown]
# From a large $t$ the unguided model draws a new image from the *mixture* of both categories: it
# has no way to know which one it was shown. The guided model keeps the input's category and
# layout, so the comparison in feature space can concentrate on what differs: the defect.
#
# What does the guided reconstruction do *inside* the defect? A detector needs it to repair the
# defect (large error inside the mask) and to reproduce everything else (small error outside). We
# compare, on the defective test images, the mean pixel error inside and outside the defect masks
# for the autoencoder alone, $\mathcal D(\mathcal E(x))$, and for the two diffusion models.

# %%
defective = torch.cat([b["image"][b["label"] == 1] for b in test.values()])
defect_masks = torch.cat([b["mask"][b["label"] == 1] for b in test.values()])
errors = {"autoencoder only": masked_errors(defective, guided.autoencode(defective), defect_masks),
          "LDM (no SG)": masked_errors(defective, plain.reconstruct(defective), defect_masks),
          "DiAD (SG)": masked_errors(defective, guided.reconstruct(defective), defect_masks)}
for name, (inside, outside) in errors.items():
    print(f"{name:17s} error inside defects {inside:.3f}   outside {outside:.3f}   ratio {inside / outside:.2f}")
# the guided model reconstructs the normal surroundings about as well as the autoencoder allows ...
assert errors["DiAD (SG)"][1] < 1.5 * errors["autoencoder only"][1]
# ... and, like the autoencoder, errs more inside the defects than outside
assert errors["DiAD (SG)"][0] > errors["DiAD (SG)"][1]

# %% [markdown]
# Two things stand out, and they decide how a small DiAD must be trained. First, **the guided
# reconstruction follows the autoencoder**: outside the defects it adds a little error to that of
# $\mathcal D(\mathcal E(x))$, and inside the defects its error is the autoencoder's: it repairs
# no more than the autoencoder already does by itself. At this scale the SG network passes its input
# through, defects included, and whatever the bottleneck of the autoencoder cannot represent is what
# gets "repaired". Second, therefore, **the autoencoder bounds everything**: a blurry
# $\mathcal D(\mathcal E(x))$ differs from its input everywhere, the feature map lights up on every
# normal texture, and detection drops towards chance. So the pipeline's small-CPU preset spends most of
# its budget on the autoencoder (see below). A sharp $\mathcal D(\mathcal E(x))$ is not enough if the
# score compares features of 64 px images: the backbone's feature maps are then 16, 8 and 4 px wide, and
# defects of a few pixels vanish in them. The paper scores 256 px images (feature maps of 64, 32 and
# 16 px), so the scoring does the same: input and reconstruction are upsampled to 256 px before the
# backbone (`score_size`, section 5). The unguided LDM, in turn, errs more outside the defects than the
# guided model: it does not know which image it was given.
#
# ## 5. From reconstruction to anomaly map and score
#
# Input and reconstruction go through the same frozen ImageNet network $\Psi$; at each of three
# scales $n$ the map is one minus the cosine similarity of the feature vectors at each position
# (eq. 9), upsampled to the image and summed (eq. 10), then smoothed by a Gaussian with
# $\sigma = 5$ (at 256 px). The image score is the maximum of the map after 8 successive $8\times 8$
# average poolings (appendix: 8x8 pooled 8 times is best, 97.2 vs 96.0 for a single 16x16 pooling) —
# pooling suppresses isolated false positives such as background specks.
#
# The paper computes $\Psi$ on 256 px images, i.e. on feature maps of 64, 32 and 16 px. Our pipeline
# gives DiAD 64 px images; fed to the backbone as they are, the same layers would give maps of 16, 8 and
# 4 px, in which one cell covers 16 x 16 px of a 64 px image — more than most defects. So
# `DiADConfig.score_size` (default: the paper's 256) resizes input and reconstruction to 256 px before
# $\Psi$: upsampling adds no detail, but each defect now spans several feature cells, as in the paper.
# The map is brought back to the input size before the blur and the pooling.

# %%
view = guided.score_view(images)  # the 48 px test images of the experiment above, as the backbone sees them
grids = [f.shape[-1] for f in guided.backbone(view)]
print(f"input {images.shape[-1]} px -> backbone input {view.shape[-1]} px -> feature maps {grids} px; "
      f"map back at {maps.shape[-1]} px")
assert view.shape[-1] == 256 and grids == [256 // s for s in guided.backbone.strides] == [64, 32, 16]
assert maps.shape[-1] == images.shape[-1]

# %% [markdown]
# ## DiAD as implemented here, and departures from the paper
#
# `vadlab.methods.diad.DiAD` has the paper's structure: KL autoencoder, SD-style U-Net with residual
# blocks, self-attention and timestep embedding, SG network with zero-initialised connections into
# the middle block and the first decoder blocks, SFF with InstanceNorm + SiLU, DDIM with 10 steps
# from $t = 999$, the cosine feature map and the pooled-max score. `DiADConfig.paper()` builds it at
# the paper's widths (table 11); the small default trains on a CPU.

# %%
for name, cfg in (("small default", DiADConfig()), ("paper widths", DiADConfig.paper())):
    counts = parameter_counts(cfg)
    print(f"{name:14s}", {k: f"{v / 1e6:.1f} M" for k, v in counts.items()})

# %% [markdown]
# Paper (table 11): denoiser 859 M, SG network 471 M, autoencoder 83.7 M. Our paper-width build
# matches the autoencoder and is a little smaller for the two U-Nets because it has no
# cross-attention to a text embedding. Departures, all forced by running on a CPU or by having no
# pretrained Stable Diffusion:
#
# - **trained from scratch, small**: the paper fine-tunes SD v1.5 and its VAE (1000 epochs,
#   AdamW 1e-5, batch 12 x 4, a V100); we train all three stages from scratch (AdamW 1e-3, batch 8;
#   the step counts of the pipeline's small-CPU preset are printed below; at 64 px its KL-f4 latent is
#   4 x 16 x 16). The plain denoiser of stage 2 plays the part of pretrained SD; as in the
#   official code, stage 3 trains SG and the denoiser's decoder half while its encoder stays frozen;
# - **no text conditioning**: DiAD feeds SD an empty prompt, a constant, so we drop cross-attention,
#   the CLIP encoder and the official code's classifier-free guidance (scale 9);
# - the autoencoder loss is L1 + KL (no LPIPS or discriminator, as the official fine-tuning);
#   the latent scale is 1/std of the training latents rather than SD's constant 0.18215;
# - scoring backbone: EfficientNet-Lite0 (strides 4, 8, 16) instead of ResNet-50 layers 1-3
#   (the paper's table 8: the backbone matters, 93.5 for EfficientNet-b0 vs 97.2 for ResNet-50), fed
#   the 64 px images upsampled to the paper's 256 px so that its feature maps have the paper's sizes;
# - every test image is noised with the same seeded noise, so predictions are reproducible;
# - the small-CPU preset starts denoising at $t = 900$ (see above), the paper at 999;
# - the small-CPU preset spends most of its budget on the autoencoder, because section 4 showed
#   that the reconstruction is never better than $\mathcal D(\mathcal E(x))$. Even so, at 64 px the small DiAD stays
#   weak under the unified protocol: the pipeline's images are a quarter of the paper's 256 px. Scoring
#   at the paper's resolution (section 5) is what lets a defect span several feature cells; exercise 4
#   below measures what it changes. The Results chapter ({doc}`results`) shows the pipeline's run next
#   to PaDiM and PatchCore;
# - the official code picks its checkpoint on the test set and flips AUROCs below 0.5; we do neither.
#
# %%
print("small-CPU preset (overrides of DiADConfig()):", CPU_PRESET)

# %% [markdown]
# Published results {cite:p}`he2024diad` (multi-class, one model for all 15 MVTec AD categories): image
# AUROC / AP / F1-max 97.2 / 99.0 / 96.5 (Table 1), pixel AUROC / AP / F1-max 96.8 / 52.6 / 55.5 (Table 3),
# AUPRO 90.7 (Table 4); on VisA {cite:p}`zou2022visa` 86.8 image AUROC, 96.0 pixel AUROC, 75.2 PRO
# (Table 2).
#
# Results on the generated dataset: see the Results chapter, {doc}`results`, where DiAD runs under the **unified**
# protocol (one model for all six categories) next to unified PaDiM and PatchCore.

# %% [markdown]
# ## Summary
#
# - A diffusion model learns to undo Gaussian noising by **predicting the noise**; the forward process
#   has a closed form $q(x_t \mid x_0)$, and DDIM reuses the same network for a deterministic 10-step
#   sampler.
# - As an anomaly detector, a diffusion model noises the test image and denoises it into a *normal*
#   version; the noising step trades erasing the defect against losing the image: plain diffusion loses
#   the category, latent diffusion with a class condition loses the instance.
# - **DiAD** conditions the denoiser on the input image itself through a semantic-guidance network
#   (zero-initialised, ControlNet-style, with SFF), so one model reconstructs every category; the map
#   compares input and reconstruction in a pretrained network's features.
# - It is the most expensive method of the book (three training stages, ten denoiser passes per test
#   image) and the only one here designed for the multi-class protocol.
#
# ## Exercises
#
# 1. *(numerical)* For DiAD's scaled-linear schedule of section 1 (`sd`, $T = 1000$), at which step $t$ does
#    $\sqrt{\bar\alpha_t}$, the weight of the image in $x_t$, fall below 0.5? Below 0.1? Check with
#    `NoiseSchedule`.
# 2. *(conceptual)* Why does DiAD start denoising at a large $t$ even though the 1-D experiment of
#    section 4 shows that plain diffusion then loses the category? What does the SG network supply that
#    the noisy latent no longer contains?
# 3. *(numerical)* Run DDIM on the 1-D mixture of section 4 with 1, 5, 10 and 50 steps from $t = 600$ and
#    plot the switch rate: compare the trend with the paper's Table 10 (1 step 66.1 image AUROC, 10 steps
#    97.2).
# 4. *(pipeline)* Run `dvc exp run -S '+methods.diad.set.score_size=null'` (the backbone sees the 64 px
#    images as they are) and compare the unified DiAD rows with the committed run in
#    `dvc exp show --only-changed`.
# 5. *(pipeline)* Run `dvc exp run -S '+methods.diad.set.noise_step=500'`: do defects survive the
#    reconstruction, as figure 6 of the paper predicts?
#
# The lab of this chapter, {download}`labs/lab_diad.py` (see {doc}`course_labs`), has you implement one
# DDIM step and the guided noise prediction (the SG network's residuals entering the denoiser), and compare
# reconstructions with and without guidance on a toy.

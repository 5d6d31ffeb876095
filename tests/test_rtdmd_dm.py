"""RTDMD's distribution-matching steps against exact ambient KL gradients on the toy teacher (the 8-mode ring):
  * acdmd_generator_loss at every stop level sigma_s > 0 and at sigma_s = 0: the kl scale's mean gradient is the exact
    d/dm KL(q_t || p_t) of a Gaussian student state (eq. 9, appendix B); the dmd2 scale (the authors', with its CPS
    step back to sigma_s) is, sample by sample, the same vector times a known positive weight;
  * stage 2's DM path (rl_dm final-step, the authors'): through rl_update, its mean gradient is the exact gradient of
    E_t KL(q_t || p_t) of the OUTPUT distribution with respect to the last step alone (x_{K-1} held fixed), and
    clearly not the all-steps gradient.
Exact values: 2-D Gauss-Hermite quadrature of the KL (60 x 60 nodes) and Gauss-Legendre over the renoise law.
Monte-Carlo bounds: 4.5 standard errors of the estimator's mean."""

import math

import numpy as np
import torch

import rtdmd
import toy2d

Z = 4.5
RING = toy2d.make_mixture("ring8")


def hermite_nodes(k=60):
    """Nodes (k^2, 2) and weights (k^2,) of E[f(xi)], xi ~ N(0, I_2)."""
    x, w = np.polynomial.hermite.hermgauss(k)
    x, w = torch.tensor(x * math.sqrt(2)), torch.tensor(w / math.sqrt(math.pi))
    gx, gy = torch.meshgrid(x, x, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1), (w[:, None] * w[None, :]).reshape(-1)


def kl_gradient(mean_t, var_t, sigma_t):
    """d/d(mean_t) of KL(N(mean_t, var_t I) || p_t), p_t the ring teacher's marginal at sigma_t: the entropy does not
    depend on the mean, so this is the gradient of -E[log p_t(mean_t + sqrt(var_t) xi)]."""
    nodes, weights = hermite_nodes()
    m = mean_t.detach().clone().requires_grad_(True)
    value = -(weights * RING.log_prob(m + math.sqrt(var_t) * nodes, sigma=sigma_t)).sum()
    (g,) = torch.autograd.grad(value, m)
    return g


class GaussianFakeWorld:
    """The ring teacher's exact denoiser; the fake is the exact denoiser of a Gaussian marginal N(mean(sigma), var(sigma) I)
    (flow score (alpha x0 - x) / sigma^2 = -(x - mean) / var), given as functions of the level."""

    def __init__(self, marginal):
        self.marginal = marginal
        self.mixture, self.path = RING, "flow"

    @staticmethod
    def alpha(sigma):
        return 1 - sigma

    @staticmethod
    def loss_weight(sigma):
        return 1.0 / sigma**2

    def x0(self, role, x, sigma, cond, cfg=1.0, adapter_scale=1.0):
        if role == "teacher":
            return RING.x0(x, sigma)
        s = rtdmd._col(sigma, x)
        mean, var = self.marginal(s)
        return (x - s**2 * (x - mean) / var) / (1 - s)


def test_acdmd_kl_step_is_the_exact_ambient_kl_gradient_and_dmd2_reweights_it():
    """A Gaussian student state x_s ~ N(m, v I) at each stop level; renoised to sigma_t, its marginal is
    q_t = N(a m, (a^2 v + sigma_ts^2) I), a = alpha_t / alpha_s. With the exact fake of q_t:
      kl:   the mean over 200k samples of the per-sample step a (s_fake - s_real)(x_t) equals d/dm KL(q_t || p_t)
            (quadrature) within 4.5 SE, at sigma_s = 0.75, 0.5, 0.25 and 0;
      dmd2: each sample's step is kl's times kappa t^2 / (a alpha_t mean|x_s - x_hat_real|) with
            kappa = (1 - s) - s cos(eta pi/2) (1 - t) / t > 0 (the CPS step back is linear in x0), exactly (float64):
            the same direction per sample, a different weighting across samples.
    Why the toy uses the kl scale: in D = 2 dims the weight 1 / mean|x_s - x_hat_real| has infinite variance (a 2-D
    difference vector has a density at 0, so P(norm < e) ~ e^2 and E[1 / norm^2] diverges), and the batch mean of the
    dmd2 steps is dominated by a few samples: measured on these 200k samples, its cosine with the exact gradient is
    +1.00 at sigma_s = 0.75, 0.5 and 0 but -1.00 at sigma_s = 0.25 (not asserted: heavy-tailed). On SD3 the mean over
    65,536 dims concentrates and the weight is nearly constant per sample."""
    gen = torch.Generator().manual_seed(0)
    n, eta = 200_000, 0.9
    m = torch.tensor([0.4, -0.3], dtype=torch.float64)
    for s, t in [(0.75, 0.85), (0.5, 0.7), (0.25, 0.5), (0.0, 0.3)]:
        v = (1 - s) ** 2 * 0.3 + s**2
        a = (1 - t) / (1 - s)
        var_t = a**2 * v + (t**2 - a**2 * s**2)
        world = GaussianFakeWorld(lambda lvl, a=a, var_t=var_t: (a * m, var_t))
        z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        eps, step_noise = torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.randn(n, 2, generator=gen,
                                                                                              dtype=torch.float64)
        sigma_t = torch.full((n,), t, dtype=torch.float64)
        steps = {}
        for scale in ("kl", "dmd2"):
            x_s = (m + math.sqrt(v) * z).requires_grad_(True)
            rtdmd.acdmd_generator_loss(world, x_s, s, None, sigma_t, eps, step_noise, 1.0, eta, scale).backward()
            steps[scale] = x_s.grad * n * (1 if scale == "kl" else 2)  # per-sample steps (dmd_loss: 1 / (n D))
        kl = steps["kl"]
        exact = kl_gradient(a * m, var_t, t) * a  # d/dm = a d/d(mean_t)
        assert bool(((kl.mean(0) - exact).abs() <= Z * kl.std(0) / math.sqrt(n)).all()), (s, kl.mean(0), exact)
        assert float(exact.norm()) > 10 * float(kl.std(0).max() / math.sqrt(n))  # a nonzero gradient to match

        x_s = m + math.sqrt(v) * z
        x_t = rtdmd.ambient_renoise(world, x_s, s, sigma_t, eps)
        x_hat_real = world.x0("teacher", x_t, sigma_t, None)
        if s > 0:
            x_hat_real = rtdmd.cps_step(x_t, x_hat_real, sigma_t, s, eta, step_noise)
        kappa = (1 - s) - s * math.cos(eta * math.pi / 2) * (1 - t) / t if s > 0 else 1.0
        assert kappa > 0
        weight = kappa * t**2 / (a * (1 - t) * (x_s - x_hat_real).abs().mean(1, keepdim=True))
        assert torch.allclose(steps["dmd2"], kl * weight, rtol=1e-9, atol=1e-12), s


class LastStepWorld(GaussianFakeWorld):
    """A 4-step toy generator whose steps before the last predict x0 = 0.3 b (any input), and whose last step (level
    sigma_3 = 0.25) predicts b + c x: every state is Gaussian, x_3 ~ N(0.75 * 0.3 b, 0.25^2 I) (CPS keeps the
    coefficients), the output N(m_out, c^2 0.25^2 I) with m_out = (1 + 0.3 * 0.75 c) b. The fake is its exact denoiser."""

    LAST = 0.25

    def __init__(self):
        self.b = torch.tensor([0.5, -0.2], dtype=torch.float64, requires_grad=True)
        self.c = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        self.dummy = torch.zeros((), dtype=torch.float64, requires_grad=True)  # the fake's "adapter"
        super().__init__(self.output_marginal)
        self.reward_fn = toy2d.Reward("linear")

    def output_marginal(self, level):
        m_out = (1 + 0.3 * (1 - self.LAST) * self.c.detach()) * self.b.detach()
        v_out = float(self.c.detach()) ** 2 * self.LAST**2
        return (1 - level) * m_out, (1 - level) ** 2 * v_out + level**2

    def x0(self, role, x, sigma, cond, cfg=1.0, adapter_scale=1.0):
        if role == "fake":
            return super().x0(role, x, sigma, cond) + 0 * self.dummy
        if role == "generator":
            if isinstance(sigma, float) and abs(sigma - self.LAST) < 1e-12:
                return self.b + self.c * x
            return (0.3 * self.b).expand_as(x) + 0 * x
        return super().x0(role, x, sigma, cond)

    def params(self, role):
        return [self.b, self.c] if role == "generator" else [self.dummy]

    def reward_terms(self, x0, cond):  # the world interface's one-term form of reward()
        return {"linear": (1.0, self.reward(x0, cond))}

    def sample_cond(self, n, generator=None):
        return torch.zeros(n, dtype=torch.long)

    def noise(self, cond, generator=None):
        return torch.randn(cond.shape[0], 2, generator=generator, dtype=torch.float64)

    def reward(self, x0, cond):
        return self.reward_fn(x0)


def renoise_law_quadrature(args, k=48):
    """Nodes and weights of sigma_t ~ U[0.01, 1] clamped to [0.02, 0.98]: atoms at the clamps, Gauss-Legendre inside."""
    lo, hi = args.renoise_offset, args.rl_renoise_max
    x, w = np.polynomial.legendre.leggauss(k)
    a, b = args.renoise_min, args.renoise_max
    nodes = [args.renoise_min, args.renoise_max] + list((b - a) / 2 * x + (a + b) / 2)
    weights = [(a - lo) / (hi - lo), (hi - b) / (hi - lo)] + list(w * (b - a) / 2 / (hi - lo))
    return nodes, weights


def test_stage2_dm_path_is_the_output_kl_gradient_through_the_last_step():
    """rl_update with the paper recipe's DM path (rl_dm final-step; kl scale here, beta 0, no L_det: the DM term
    alone): its gradient w.r.t. b is, in the mean over 24 rollouts of 4096 trajectories, the exact
    d/d delta E_t KL(shift_delta(q)_t || p_t) of the output distribution q (the last step's output moved by delta,
    x_3 held fixed), t over the renoise law, within 4.5 SE; and it is > 10 SE away from the all-steps gradient, which
    also moves x_3 (by 0.3 * 0.75 c = 0.18 of b: that derivative is 1.18 times larger)."""
    world = LastStepWorld()
    args = rtdmd.resolve_defaults(rtdmd.Args(dm_scale="kl", beta=0.0, reward_backprop=False, grad_clip=0.0, groups=256,
                                             group_size=16, dm_weight_rl=1.0, gamma=0.0))
    rtdmd.validate(args)
    schedule = [1.0, 0.75, 0.5, 0.25, 0.0]
    opt_generator = torch.optim.SGD(world.params("generator"), lr=0.0)
    opt_fake = torch.optim.SGD(world.params("fake"), lr=0.0)
    torch.manual_seed(1)
    grads = []
    for _ in range(24):
        rtdmd.rl_update(world, args, schedule, opt_generator, opt_fake)
        grads.append(world.b.grad.clone())
    grads = torch.stack(grads)
    est, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    mean_out, var_out = world.output_marginal(0.0)
    exact = torch.zeros(2, dtype=torch.float64)
    for t, w in zip(*renoise_law_quadrature(args)):
        exact += w * (1 - t) * kl_gradient((1 - t) * mean_out, (1 - t) ** 2 * var_out + t**2, t)
    assert bool(((est - exact).abs() <= Z * se).all()), (est, exact, se)
    all_steps = exact * (1 + 0.3 * 0.75 * float(world.c.detach()))
    assert bool(((est - all_steps).abs() > 10 * se).any()), (est, all_steps, se)

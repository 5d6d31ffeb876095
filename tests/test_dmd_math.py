"""dmd.py's estimators against exact answers on the toy: the DMD gradient is the gradient of KL(p_theta,sigma || p_sigma),
the DMD2 normalisation only rescales it per sample, and the fake-score loss is minimised by the student's own denoiser."""

import math

import pytest
import torch

import dmd
import toy2d

SIGMA = 0.5


class GaussianStudent:
    """x = mu + s eps in 2-D; its marginal at level sigma is N(alpha mu, (alpha^2 s^2 + sigma^2) I), with exact x0."""

    def __init__(self, mu, log_s):
        self.mu = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
        self.log_s = torch.tensor(log_s, dtype=torch.float64, requires_grad=True)

    def sample(self, eps):
        return self.mu + self.log_s.exp() * eps

    def var(self, alpha, sigma):
        return alpha**2 * self.log_s.exp() ** 2 + sigma**2

    def log_prob(self, x, alpha, sigma):
        v = self.var(alpha, sigma)
        return -((x - alpha * self.mu) ** 2).sum(-1) / (2 * v) - torch.log(2 * math.pi * v)

    def x0(self, x, alpha, sigma):  # Tweedie with the exact Gaussian score
        v = self.var(alpha, sigma).detach()
        return (x - sigma**2 * (x - alpha * self.mu.detach()) / v) / alpha


def exact_kl_grad(student, teacher_log_prob, alpha, sigma):
    """d/d(mu, log s) of KL(p_theta,sigma || p_sigma) by 2-D quadrature (midpoint rule, h = 0.015 on [-6, 6]^2:
    the integrand is smooth and decays like a Gaussian, so the rule's error is far below the Monte-Carlo error)."""
    lin = torch.arange(-6, 6, 0.015, dtype=torch.float64) + 0.0075
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    logq = student.log_prob(grid, alpha, sigma)
    kl = (logq.exp() * (logq - teacher_log_prob(grid))).sum() * 0.015**2
    g_mu, g_logs = torch.autograd.grad(kl, [student.mu, student.log_s])
    return torch.cat([g_mu, g_logs.reshape(1)])


def dmd_grad_estimate(student, world, alpha, sigma, n, seed):
    """The DMD estimator of d KL / d theta through dmd.dmd_loss, and its per-sample terms (for the standard error).
    Per sample: u = (alpha^2 / sigma^2)(x0_fake - x0_real) = (alpha^2 / sigma^2)(p_real - p_fake) at x renoised to sigma;
    d KL / d theta = E[u . dx/dtheta]. dmd_loss(x, u) has d/dx = u / numel, so numel * its theta-gradient is sum_i u_i dx_i/dtheta."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = student.sample(eps)  # (n, 2), depends on theta
    with torch.no_grad():
        x_t = world.renoise(x, sigma, torch.randn(n, 2, generator=gen, dtype=torch.float64))
        x0_real = world.x0("teacher", x_t, sigma, world.sample_cond(n))
        x0_fake = student.x0(x_t, alpha, sigma)
        u = (alpha**2 / sigma**2) * ((x - x0_real) - (x - x0_fake))
    loss = dmd.dmd_loss(x, u) * x.numel() / n  # mean over samples of u_i . x_i (up to a theta-free constant)
    g_mu, g_logs = torch.autograd.grad(loss, [student.mu, student.log_s])
    estimate = torch.cat([g_mu, g_logs.reshape(1)])
    s = student.log_s.exp().detach()
    per_sample = torch.cat([u, (s * eps * u).sum(-1, keepdim=True)], -1)  # u . dx/dmu, u . dx/dlog s
    return estimate, per_sample


@pytest.mark.parametrize("teacher", ["gaussian", "ring8"])
@pytest.mark.parametrize("path", ["flow", "vp"])
def test_dmd_gradient_is_kl_gradient(teacher, path):
    """Mean DMD estimate within 4.5 standard errors of the exact KL gradient, per coordinate (3 coordinates, 8 cases:
    a false failure has probability ~1e-4 overall). The estimate is nonzero, so a sign error fails by ~2x the value."""
    if teacher == "gaussian":  # a one-mode "mixture": N((1, -0.5), 0.6^2 I), KL gradient by quadrature too
        world = toy2d.ToyWorld("ring8", path=path)
        world.mixture = toy2d.GaussianMixture([[1.0, -0.5]], [1.0], 0.6)
    else:
        world = toy2d.ToyWorld(teacher, path=path)
    alpha = float(world.alpha(torch.tensor(SIGMA, dtype=torch.float64)))
    student = GaussianStudent([0.8, 0.3], math.log(0.7))
    exact = exact_kl_grad(student, lambda g: world.mixture.log_prob(g, SIGMA, path), alpha, SIGMA)
    estimate, per_sample = dmd_grad_estimate(student, world, alpha, SIGMA, 200_000, seed=0)
    torch.testing.assert_close(estimate, per_sample.mean(0))  # dmd_loss's autograd == the per-sample sum
    se = per_sample.std(0) / math.sqrt(per_sample.shape[0])
    assert ((estimate - exact).abs() < 4.5 * se).all(), (estimate, exact, se)
    assert exact.norm() > 20 * se.norm()  # the test has power: the gradient is far from zero at this accuracy


def test_gaussian_quadrature_matches_closed_form_kl():
    """The quadrature used above, checked once against the closed-form Gaussian KL gradient (independent formula)."""
    student = GaussianStudent([0.8, 0.3], math.log(0.7))
    alpha, m, v_t = 0.5, torch.tensor([0.5, -0.25], dtype=torch.float64), 0.5**2 * 0.36 + 0.25
    teacher = toy2d.GaussianMixture([[1.0, -0.5]], [1.0], 0.6)
    quad = exact_kl_grad(student, lambda g: teacher.log_prob(g, 0.5, "flow"), alpha, 0.5)
    v_s = student.var(alpha, 0.5)
    kl = 2 * 0.5 * (v_s / v_t - 1 - torch.log(v_s / v_t)) + ((alpha * student.mu - m) ** 2).sum() / (2 * v_t)
    closed = torch.autograd.grad(kl, [student.mu, student.log_s])
    torch.testing.assert_close(quad, torch.cat([closed[0], closed[1].reshape(1)]), rtol=1e-7, atol=1e-9)


def test_dmd2_normalisation_only_rescales_per_sample():
    """dmd_grad = (x0_fake - x0_real) / mean|x - x0_real|: per sample the same direction, a positive scale; and
    dmd_loss's gradient w.r.t. x is exactly grad / numel."""
    gen = torch.Generator().manual_seed(1)
    x, x0_real, x0_fake = (torch.randn(64, 3, 4, generator=gen) for _ in range(3))
    grad = dmd.dmd_grad(x, x0_real, x0_fake)
    scale = (x - x0_real).abs().mean(dim=(1, 2), keepdim=True)
    assert (scale > 0).all()
    torch.testing.assert_close(grad * scale, x0_fake - x0_real)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dmd.dmd_loss(xg, grad), xg)
    torch.testing.assert_close(g, grad / x.numel())


def test_fake_score_loss_is_minimised_by_the_students_denoiser():
    """Train the toy world's fake adapter with dmd.fake_score_loss on samples of a known Gaussian N(m, 0.5^2 I) (not the
    teacher). Its minimiser is E[x0 | x_sigma] of that Gaussian (closed form below). We require the trained fake to
    close at least 90% of the teacher's initial gap to it (RMS over the Gaussian's own noisy marginal,
    sigma in {0.2, 0.5, 0.8}): a network of finite capacity trained for a few seconds does not reach 0 error (it closes
    ~95% here: the rest is SGD noise), and a loss whose optimum were anything else cannot close 90%."""
    torch.manual_seed(0)
    world = toy2d.ToyWorld("ring8")
    m, s = torch.tensor([0.5, -0.3]), 0.5
    steps = 2000
    opt = torch.optim.Adam(world.params("fake"), lr=3e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # anneal away the SGD noise floor
    for _ in range(steps):
        x0 = m + s * torch.randn(512, 2)
        loss = dmd.fake_score_loss(world, x0, world.sample_cond(512), torch.rand(512).clamp(min=1e-3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    gaps = []
    with torch.no_grad():
        for sigma in (0.2, 0.5, 0.8):
            alpha = 1 - sigma
            x_t = alpha * (m + s * torch.randn(4000, 2)) + sigma * torch.randn(4000, 2)
            v = alpha**2 * s**2 + sigma**2
            exact = m + (alpha * s**2 / v) * (x_t - alpha * m)  # Gaussian posterior mean
            cond = world.sample_cond(4000)
            err_fake = (world.x0("fake", x_t, sigma, cond) - exact).pow(2).sum(-1).mean().sqrt()
            err_teacher = (world.x0("teacher", x_t, sigma, cond) - exact).pow(2).sum(-1).mean().sqrt()
            gaps.append((float(err_fake), float(err_teacher)))
    for err_fake, err_teacher in gaps:
        assert err_fake < 0.1 * err_teacher, gaps

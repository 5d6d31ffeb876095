"""The toy teacher is exact: scores, x0-predictions, guidance and adapters checked against independent computations."""

import pytest
import torch

import toy2d
from toy2d.mixture import path_alpha

torch.set_default_dtype(torch.float32)
PATHS_SIGMAS = [("flow", 0.1), ("flow", 0.5), ("flow", 0.9), ("vp", 0.3), ("vp", 0.8)]


def autograd_score(mixture, x, sigma, path, cond=None):
    x = x.double().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mixture.log_prob(x, sigma, path, cond).sum(), x)
    return g


@pytest.mark.parametrize("name", ["ring8", "grid25", "line3"])
@pytest.mark.parametrize("path,sigma", PATHS_SIGMAS)
def test_score_is_gradient_of_log_density(name, path, sigma):
    mixture = toy2d.make_mixture(name, n_classes=3)
    x = 2.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for cond in (None, torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))):
        exact = mixture.score(x, sigma, path, cond)
        torch.testing.assert_close(exact, autograd_score(mixture, x, sigma, path, cond), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path,sigma", PATHS_SIGMAS)
def test_x0_satisfies_tweedie(path, sigma):
    """Tweedie: E[x0 | x] = (x + sigma^2 grad log p_sigma(x)) / alpha, with the score from autograd."""
    mixture = toy2d.make_mixture("ring8")
    x = 2.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha = path_alpha(torch.tensor(sigma, dtype=torch.float64), path)
    tweedie = (x + sigma**2 * autograd_score(mixture, x, sigma, path)) / alpha
    torch.testing.assert_close(mixture.x0(x, sigma, path), tweedie, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path,sigma", [("flow", 0.5), ("vp", 0.6)])
def test_x0_matches_monte_carlo_posterior_mean(path, sigma):
    """E[x0 | x_sigma = q] by self-normalised importance sampling over teacher samples x0_i with weights
    N(q; alpha x0_i, sigma^2 I). Its standard error (delta method) is sqrt(sum w_i^2 (x0_i - m)^2) / sum w_i; the exact
    posterior mean must lie within 4.5 standard errors per coordinate (two-sided, ~1e-5 chance per check if correct)."""
    gen = torch.Generator().manual_seed(3)
    mixture = toy2d.make_mixture("ring8")
    x0 = mixture.sample(400_000, gen).double()
    alpha = float(path_alpha(torch.tensor(sigma), path))
    queries = torch.tensor([[1.0, 0.2], [-0.3, -0.9], [0.0, 0.0], [0.7, 0.7]], dtype=torch.float64)
    exact = mixture.x0(queries, sigma, path)
    for q, ex in zip(queries, exact):
        logw = -((q - alpha * x0) ** 2).sum(-1) / (2 * sigma**2)
        w = (logw - logw.max()).exp()
        m = (w[:, None] * x0).sum(0) / w.sum()
        se = ((w[:, None] ** 2) * (x0 - m) ** 2).sum(0).sqrt() / w.sum()
        assert ((m - ex).abs() < 4.5 * se).all(), (q, m, ex, se)


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_classifier_free_guidance_is_exact(path):
    """The guided teacher uncond + w (cond - uncond) is the denoiser of the guided score w s_c + (1 - w) s_u =
    grad log p_c^w p_u^(1-w): check world.x0 with cfg against Tweedie on the autograd of that log-density."""
    world = toy2d.ToyWorld("ring8", path=path, n_classes=2)
    gen = torch.Generator().manual_seed(4)
    cond = world.sample_cond(32, gen)
    x, sigma, w = 1.5 * torch.randn(32, 2, generator=gen, dtype=torch.float64), 0.6, 3.0
    xg = x.clone().requires_grad_(True)
    m = world.mixture
    logp = w * m.log_prob(xg, sigma, path, cond) + (1 - w) * m.log_prob(xg, sigma, path, world.null_cond(cond))
    (score,) = torch.autograd.grad(logp.sum(), xg)
    alpha = float(world.alpha(torch.tensor(sigma, dtype=torch.float64)))
    with torch.no_grad():
        guided = world.x0("teacher", x, sigma, cond, cfg=w)
    torch.testing.assert_close(guided, (x + sigma**2 * score) / alpha, rtol=1e-9, atol=1e-9)
    # guidance changes a conditional prediction, and is a no-op on the null condition
    assert (guided - world.x0("teacher", x, sigma, cond)).abs().max() > 0.1
    null = world.null_cond(cond)
    torch.testing.assert_close(world.x0("teacher", x, sigma, null, cfg=w), world.x0("teacher", x, sigma, null))


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_adapters_start_as_teacher_and_act_on_native_output(path):
    """At init fake == generator == teacher (zero last layer, like LoRA). An adapter output b is added to the model's
    native prediction: the velocity (flow: x0 = x0_teacher - sigma b) or the noise (vp: x0 = x0_teacher - sigma/alpha b);
    adapter_scale multiplies it (DynaDG's teacher + lambda * fake)."""
    world = toy2d.ToyWorld("ring8", path=path, n_classes=2)
    gen = torch.Generator().manual_seed(5)
    cond = world.sample_cond(16, gen)
    x, sigma = torch.randn(16, 2, generator=gen), 0.4
    with torch.no_grad():
        teacher = world.x0("teacher", x, sigma, cond, cfg=2.0)
        for role in ("fake", "generator"):
            torch.testing.assert_close(world.x0(role, x, sigma, cond, cfg=2.0), teacher)
        b = torch.tensor([0.3, -0.2])
        world.adapters["fake"].out.bias.copy_(b)
        alpha = float(world.alpha(torch.tensor(sigma)))
        to_x0 = sigma if path == "flow" else sigma / alpha
        for scale in (1.0, 0.5, 2.0):
            got = world.x0("fake", x, sigma, cond, cfg=2.0, adapter_scale=scale)
            torch.testing.assert_close(got, teacher - scale * to_x0 * b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(world.x0("generator", x, sigma, cond), world.x0("teacher", x, sigma, cond))


def test_sampling_matches_density():
    """Samples' per-mode frequencies match the weights (binomial 4.5-sigma bound), the density integrates to 1 on a
    grid, and conditional samples only come from their class's modes."""
    mixture = toy2d.make_mixture("grid25", spread=0.1, n_classes=3)  # not the default 0.15: nearest mode = true mode
    n = 200_000
    x = mixture.sample(n, torch.Generator().manual_seed(6)).double()
    k = torch.cdist(x, mixture.means).argmin(-1)  # spread 0.1, spacing 1: P(nearest != true) < 4 Phi(-5) ~ 1e-6
    freq = torch.bincount(k, minlength=25).double() / n
    se = (mixture.weights * (1 - mixture.weights) / n).sqrt()
    assert ((freq - mixture.weights).abs() < 4.5 * se).all()
    lin = torch.linspace(-4, 4, 801, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    for sigma in (0.0, 0.5):
        mass = mixture.log_prob(grid, sigma, "flow").exp().sum() * (lin[1] - lin[0]) ** 2
        assert abs(float(mass) - 1) < 1e-6
    cond = torch.full((1000,), 1)
    xc = mixture.sample(1000, torch.Generator().manual_seed(7), cond).double()
    assert (mixture.classes[torch.cdist(xc, mixture.means).argmin(-1)] == 1).all()


def test_named_mixtures_and_bad_names():
    grid = toy2d.make_mixture("grid25")
    assert grid.n_modes == 25 and float(grid.weights.max() / grid.weights.min()) == pytest.approx(9.0)
    ring = toy2d.make_mixture("ring8", spread=0.3)
    assert ring.n_modes == 8 and ring.std == 0.3
    torch.testing.assert_close(ring.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="valid mixtures: ring8, grid25, line3"):
        toy2d.make_mixture("ring9")
    with pytest.raises(ValueError, match="spread"):
        toy2d.make_mixture("ring8", spread=-1.0)
    with pytest.raises(ValueError, match="valid rewards"):
        toy2d.Reward("fancy")
    with pytest.raises(ValueError, match="valid paths"):
        toy2d.ToyWorld(path="ve")


def test_flow_path_endpoints_and_shift():
    world = toy2d.ToyWorld("ring8", shift=3.0)
    # SD3's shift: t = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75; end points fixed
    assert float(world.sigma(torch.tensor(0.5))) == pytest.approx(0.75)
    assert float(world.sigma(torch.tensor(1.0))) == pytest.approx(1.0)
    x0, eps = torch.randn(8, 2), torch.randn(8, 2)
    torch.testing.assert_close(world.renoise(x0, 1.0, eps), eps)  # sigma = 1 is pure noise
    torch.testing.assert_close(world.renoise(x0, 0.0, eps), x0)
    vp = toy2d.ToyWorld("ring8", path="vp")
    a = float(vp.alpha(torch.tensor(0.6)))
    assert a == pytest.approx(0.8)  # alpha^2 + sigma^2 = 1
    assert float(vp.sigma(torch.tensor(1.0))) == pytest.approx(0.9977, rel=1e-6)

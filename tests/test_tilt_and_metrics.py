"""The exact reward-tilted teacher against importance weighting, and the sample-set metrics on known cases."""

import math

import pytest
import torch

import toy2d


@pytest.mark.parametrize("reward,beta", [("linear", 1.5), ("quadratic", 0.8)])
def test_tilted_density_is_teacher_times_exp_beta_r(reward, beta):
    """log p~(x) - log p(x) - beta r(x) must be the same constant (-log Z) at every x."""
    world = toy2d.ToyWorld("grid25", reward=reward, reward_angle=30.0, reward_target=(1.0, -0.5))
    tilted = world.reward_fn.tilt(world.mixture, beta)
    x = 3 * torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    diff = tilted.log_prob(x) - world.mixture.log_prob(x) - beta * world.reward_fn(x)
    assert float(diff.max() - diff.min()) < 1e-9


@pytest.mark.parametrize("reward,beta", [("linear", 1.5), ("quadratic", 0.8)])
def test_tilted_teacher_matches_importance_weighted_teacher(reward, beta):
    """Self-normalised importance weights exp(beta r) on teacher samples estimate E_p~[f]; for f = x, x^2 and the mode
    indicators, the exact tilted mixture's values must lie within 4.5 delta-method standard errors."""
    world = toy2d.ToyWorld("ring8", reward=reward, reward_angle=30.0, reward_target=(1.0, -0.5))
    tilted = world.reward_fn.tilt(world.mixture, beta)
    n = 400_000
    x = world.mixture.sample(n, torch.Generator().manual_seed(1)).double()
    logw = beta * world.reward_fn(x)
    w = (logw - logw.max()).exp()
    w = w / w.sum()
    xt = tilted.sample(2_000_000, torch.Generator().manual_seed(2)).double()  # exact moments of p~ by sampling it

    def check(f_teacher, f_exact_mean, f_exact_se=0.0):
        est = (w[:, None] * f_teacher).sum(0)
        se = ((w[:, None] ** 2) * (f_teacher - est) ** 2).sum(0).sqrt()
        assert ((est - f_exact_mean).abs() < 4.5 * (se**2 + f_exact_se**2).sqrt()).all(), (est, f_exact_mean, se)

    for f in (lambda z: z, lambda z: z**2):
        ft = f(xt)
        check(f(x), ft.mean(0), ft.std(0) / math.sqrt(ft.shape[0]))
    # mode masses: the tilted weights themselves (modes are 11 stds apart, so nearest-mode assignment is exact)
    onehot = torch.nn.functional.one_hot(torch.cdist(x, world.mixture.means).argmin(-1), 8).double()
    check(onehot, tilted.weights)


def test_energy_distance_floor_and_shift():
    """Same distribution: the V-statistic's mean over repeats equals the floor D (1/n + 1/m). A 1-D shift by delta:
    its mean equals the population energy distance + floor, with E|N(d, 2)| = 2/sqrt(pi) e^{-d^2/4} + d erf(d/2).
    Both within 4.5 standard errors of the mean over 40 repeats."""
    gen = torch.Generator().manual_seed(3)
    n, m, reps, delta = 300, 500, 40, 0.7

    def e_abs_normal(mu, var):  # E|N(mu, var)|
        s = math.sqrt(var)
        return s * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * var)) + mu * math.erf(mu / (s * math.sqrt(2)))

    d_same = e_abs_normal(0, 2)  # E|X - X'| for X, X' ~ N(0, 1)
    same, shifted = [], []
    for _ in range(reps):
        x, y = torch.randn(n, 1, generator=gen), torch.randn(m, 1, generator=gen)
        same.append(toy2d.energy_distance(x, y))
        shifted.append(toy2d.energy_distance(x, y + delta))
    same, shifted = torch.tensor(same), torch.tensor(shifted)
    floor = d_same * (1 / n + 1 / m)
    population = 2 * e_abs_normal(delta, 2) - 2 * d_same
    for values, expected in ((same, floor), (shifted, population + floor)):
        assert abs(float(values.mean()) - expected) < 4.5 * float(values.std()) / math.sqrt(reps)
    # the floor estimated from one reference set agrees with the exact one to within 5% (D's own sampling error ~1%)
    ref = torch.randn(4000, 1, generator=gen)
    assert toy2d.energy_floor(ref, n, m) == pytest.approx(floor, rel=0.05)
    assert toy2d.energy_distance(ref, ref) == pytest.approx(0.0, abs=1e-9)


def test_mode_masses_of_exact_samples():
    """Exact teacher samples: each mode holds w_k (1 - e^{-4.5}) of the samples (a 2-D isotropic Gaussian puts
    e^{-r^2/2} outside r = 3 stds), within 4.5 binomial standard errors; all modes covered; nothing off-manifold."""
    mixture = toy2d.make_mixture("grid25")
    n = 100_000
    x = mixture.sample(n, torch.Generator().manual_seed(4))
    p = mixture.weights * (1 - math.exp(-4.5))
    masses = toy2d.mode_masses(x, mixture)
    assert ((masses - p).abs() < 4.5 * (p * (1 - p) / n).sqrt()).all()
    assert toy2d.modes_covered(x, mixture) == 25
    collapsed = mixture.means[:1].float().expand(1000, 2)  # everything on one mode
    assert toy2d.modes_covered(collapsed, mixture) == 1
    w0 = float(mixture.weights[0])  # the worst mode is the overfull one: |1 - w0| / w0 (empty modes are off by 100%)
    assert toy2d.max_relative_mass_error(collapsed, mixture) == pytest.approx((1 - w0) / w0)


def test_teacher_logp_flags_off_manifold_samples():
    world = toy2d.ToyWorld("ring8")
    on = world.mixture.sample(2000, torch.Generator().manual_seed(5))
    off = 1.8 * on  # pushed radially off the ring (r = 3.6)
    cond = world.sample_cond(2000)
    assert world.evaluate(off, cond)["teacher_logp"] < world.evaluate(on, cond)["teacher_logp"] - 20


def test_voronoi_mode_mass_and_off_manifold_fraction():
    """The two halves of "where did the mass go": on the 8-mode ring (equal weights, symmetric), exact samples put 1/8
    of the mass in each mode's Voronoi cell (4.5 binomial SEs), and exp(-4.5) = 1.1% of them lie beyond 3 mode-stds
    of every mode (2-D Gaussian tail; neighbouring modes sit 6.1 stds apart, so overlaps change this by < 1e-4)."""
    mixture = toy2d.make_mixture("ring8")
    n = 100_000
    x = mixture.sample(n, torch.Generator().manual_seed(6))
    se = math.sqrt(0.125 * 0.875 / n)
    assert toy2d.max_relative_mass_error(x, mixture) < 4.5 * se / 0.125
    tail = math.exp(-4.5)
    assert abs(toy2d.off_manifold_fraction(x, mixture) - tail) < 4.5 * math.sqrt(tail * (1 - tail) / n)
    assert toy2d.off_manifold_fraction(2.5 * x, mixture) > 0.999  # pushed radially off the ring (r = 5: 12 stds out)


def test_mode_width_ratios_of_exact_samples_stay_in_their_sampling_band_and_narrow_modes_are_caught():
    """The per-mode width metric, against exact answers. Its sampling band: a mode's std from N = 2 m scalar
    deviations (m samples within 3 stds, 2 coordinates) has relative standard error ~ 1 / sqrt(2 N); the ratio of two
    such estimates (student, reference) ~ sqrt(2) / sqrt(2 N) = 1 / sqrt(2 m), 3.2% at m = 500 (4000 samples over 8
    modes). Over 8 modes, |z| < 3.3 on all of them with probability ~0.99, so exact samples must give ratios within
    1 +- 3.3 / sqrt(2 m) = 1 +- 0.104: checked on 5 independent draws. A mixture whose modes are 0.15 wide instead of 0.25
    (energy distance only ~0.003 from the teacher, 2x the noise floor) must read 0.6 within the same band."""
    import toy2d
    from toy2d.metrics import energy_distance, mode_width_ratios

    ring = toy2d.make_mixture("ring8")
    narrow = toy2d.make_mixture("ring8", spread=0.6 * float(ring.std))
    band = 3.3 / (2 * 4000 / 8) ** 0.5
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        reference, samples = ring.sample(4000, gen), ring.sample(4000, gen)
        widths = mode_width_ratios(samples, reference, ring)
        assert 1 - band < widths["mode_width_min"] and widths["mode_width_max"] < 1 + band, widths
    gen = torch.Generator().manual_seed(9)
    reference, thin = ring.sample(4000, gen), narrow.sample(4000, gen)
    widths = mode_width_ratios(thin, reference, ring)
    assert 0.6 - band < widths["mode_width_min"] and widths["mode_width_max"] < 0.6 + band, widths
    assert energy_distance(thin, reference) < 0.01  # what energy distance alone would have let through

"""Which distribution does RTDMD's stage 2 converge to? Eq. 7 says KL(q || p~), p~ = p exp(beta r) / Z. What the
natural recipe descends is the surrogate

    J(q) = E_t KL(q_t || p_t) - beta E_q[r],    t ~ the renoise law (U[0.01, 0.5] clamped at 0.02),

whose minimiser is NOT p~: at a level t the ambient KL resists a tilt less than the clean KL does (noise blurs a
mode's shift and, once modes overlap, their weights). This file computes J's minimiser on the toy exactly (up to a
grid): q is a probability vector on an N x N grid of cells, q_t = K_t q K_t^T with K_t the cell-to-cell Gaussian kernel
of x_t = (1 - t) x0 + t eps (separable, cell-integrated), p_t the same map of p's cell masses (so q = p gives KL = 0
exactly), and J is minimised by exponentiated gradient (J is convex in q):
    dJ/dq = sum_t w_t K_t^T log(q_t / p_t) K_t - beta r,    q <- q exp(-lr (dJ/dq - E_q dJ/dq)) / Z.
Its two temperatures are reported separately (fixed_point_temperatures): the mode weights' (log W_k regressed on
beta d . mu_k, 1 for p~) and the within-mode shift's (d . (mean_k - mu_k) / (beta s^2), 1 for p~).

Then the students: the natural recipe's stage 2 against this fixed point, and the exact-tilt option (DM against p~'s
own noisy marginals), which should reach p~ itself."""

import copy
import math

import numpy as np
import pytest
import torch

import rtdmd
import toy2d

BETA = 1.0


def level_quadrature(lo, hi, clamp_min, n_nodes=16):
    """Nodes and weights of sigma ~ U[lo, hi] clamped below at clamp_min: an atom at clamp_min, Gauss-Legendre above."""
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    a, b = max(lo, clamp_min), hi
    nodes = [clamp_min] + list((b - a) / 2 * x + (a + b) / 2)
    weights = [(clamp_min - lo) / (hi - lo) if clamp_min > lo else 0.0] + list(w * (b - a) / 2 / (hi - lo))
    return nodes, weights


def cell_kernel(edges, centers, sigma):
    """K[i, j] = P(y in cell i | x0 = centers[j]), y = (1 - sigma) x0 + sigma eps, in 1-D (the 2-D kernel is K x K)."""
    z = (edges[:, None] - (1 - sigma) * centers[None, :]) / sigma
    cdf = torch.distributions.Normal(0.0, 1.0).cdf(z)
    return cdf[1:] - cdf[:-1]


def fixed_point_on_grid(mixture, reward, beta, levels, weights, half_width=4.0, cells=120, iters=400, lr=0.5):
    """The minimiser of J(q) = sum_t w_t KL(q_t || p_t) - beta E_q[r] over distributions on the grid (see the module
    docstring). Returns (q (cells^2,), cell centres (cells^2, 2), the gradient's residual std under q at the end)."""
    edges = torch.linspace(-half_width, half_width, cells + 1, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    gx, gy = torch.meshgrid(centers, centers, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    p = mixture.log_prob(points).exp().reshape(cells, cells)
    p = p / p.sum()
    r = reward(points.float()).double().reshape(cells, cells)
    kernels = [cell_kernel(edges, centers, float(t)) for t in levels]
    p_t = [k @ p @ k.T for k in kernels]
    q = p * torch.exp(beta * r)
    q = q / q.sum()
    for _ in range(iters):
        grad = -beta * r
        for k, w, pt in zip(kernels, weights, p_t):
            if w > 0:
                grad = grad + w * (k.T @ torch.log((k @ q @ k.T).clamp(min=1e-300) / pt.clamp(min=1e-300)) @ k)
        centred = grad - (q * grad).sum()
        q = q * torch.exp(-lr * centred)
        q = q / q.sum()
    return q.reshape(-1), points, float(((centred**2) * q).sum().sqrt())


def temperatures(points, masses, mixture, direction, beta):
    """(weight temperature, shift temperature, mode weights) of a distribution given as masses on points: each point
    goes to its nearest mode k (Voronoi); log W_k regressed on beta d . mu_k over the modes above 0.2% of the mass; the
    mass-weighted mean of d . (mean_k - mu_k) / (beta s^2). p~ (linear reward) has 1 and 1."""
    x, m = points.double(), masses.double()
    near = torch.cdist(x, mixture.means).argmin(1)
    w = torch.zeros(mixture.n_modes, dtype=torch.float64).index_add_(0, near, m)
    mean = torch.zeros(mixture.n_modes, 2, dtype=torch.float64).index_add_(0, near, m[:, None] * x) / w[:, None]
    proj, ok = mixture.means @ direction.double(), w > 0.002
    lw, pr = w[ok].log(), proj[ok]
    tau_w = float(((lw - lw.mean()) * (pr - pr.mean())).sum() / ((pr - pr.mean()) ** 2).sum()) / beta
    shift = ((mean - mixture.means) @ direction.double()) / (mixture.std**2 * beta)
    return tau_w, float((w[ok] * shift[ok]).sum() / w[ok].sum()), w


@pytest.fixture(scope="module")
def world():
    return toy2d.ToyWorld()


@pytest.fixture(scope="module")
def natural_fixed_point(world):
    args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(stage2_recipe="natural")))
    levels, weights = level_quadrature(args.renoise_offset, args.rl_renoise_max, args.renoise_min)
    return fixed_point_on_grid(world.mixture, world.reward_fn, BETA, levels, weights)


def test_solver_recovers_p_tilde_when_only_clean_levels_count_and_p_at_beta_0(world):
    """Exact answers of the solver: with every level at t = 0.002 (KL(q_t || p_t) -> KL(q || p)) its minimiser is p~,
    temperatures 1 and 1 (to 2%: the grid's cells are 0.067 wide against a shift of 0.0625 = beta s^2); at beta = 0 it
    is p itself (E_q[r] = E_p[r] = 0 to 1e-6)."""
    q, points, resid = fixed_point_on_grid(world.mixture, world.reward_fn, BETA, [0.002], [1.0], iters=100)
    assert resid < 1e-6
    tau_w, tau_shift, _ = temperatures(points, q, world.mixture, world.reward_fn.direction, BETA)
    assert tau_w == pytest.approx(1.0, abs=0.02) and tau_shift == pytest.approx(1.0, abs=0.02)
    q0, points, _ = fixed_point_on_grid(world.mixture, world.reward_fn, 0.0, [0.1, 0.4], [0.5, 0.5], iters=20)
    assert abs(float((q0 * world.reward_fn(points.float()).double()).sum())) < 1e-6


def test_natural_surrogate_fixed_point_is_hotter_than_p_tilde(world, natural_fixed_point):
    """The natural recipe's surrogate at the toy default (ring8, linear reward, beta 1, levels U[0.01, 0.5] clamped at
    0.02), exactly on the grid: converged (residual < 1e-6), mode weights at temperature 1.063 and a within-mode shift
    of 1.96 beta s^2 (the 0-degree mode alone: 2.14), E_q[r] = 1.572 against p~'s 1.458: a different target from p~.
    (In energy distance the two are close: 0.005-0.010 between 4000-sample sets, 5-11 floors, seeds 0-2; energy
    distance barely sees a shift of 0.06 inside modes of std 0.25, so the tests below compare temperatures.)"""
    q, points, resid = natural_fixed_point
    assert resid < 1e-6
    tau_w, tau_shift, _ = temperatures(points, q, world.mixture, world.reward_fn.direction, BETA)
    reward = float((q * world.reward_fn(points.float()).double()).sum())
    assert tau_w == pytest.approx(1.063, abs=0.01) and tau_shift == pytest.approx(1.96, abs=0.02)
    assert reward == pytest.approx(1.572, abs=0.002)
    tilted = world.reward_fn.tilt(world.mixture, BETA)
    p_tilde_reward = float(tilted.weights @ (tilted.means @ world.reward_fn.direction.double()))
    assert p_tilde_reward == pytest.approx(1.458, abs=0.001)


# ---------------------------------------------------------------------------------------------------------------
# The students: one cold start (the toy default, seed 0), then each stage 2 from the same checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """Stage 1 (AC-DMD, 400 updates, the toy defaults), seed 0; the world holds the EMA generator stage 2 starts from."""
    torch.set_num_threads(1)
    out = rtdmd.main(rtdmd.Args(output_dir=str(tmp_path_factory.mktemp("cold")), progress=False, seed=0, rl_steps=0,
                                eval_every=10_000, eval_samples=500))
    with rtdmd.ema_weights(out["world"], out["ema"]):
        return copy.deepcopy(out["world"])


def stage2(cold_start, tmp_path, **over):
    """Stage 2 from the cold start (seed 0); returns (4000 EMA-student samples at the held-out seed, their metrics)."""
    world = copy.deepcopy(cold_start)
    args = rtdmd.Args(output_dir=str(tmp_path), progress=False, seed=0, cold_steps=0, eval_every=10_000, eval_samples=500,
                      **over)
    out = rtdmd.main(args, world=world)
    with rtdmd.ema_weights(world, out["ema"]):
        samples, _, metrics = rtdmd.evaluate(world, rtdmd.student_schedule(world, 4), args.eta, 4000, 12345, BETA)
    return samples, metrics


def state_distances(world, n=4000, seed=7):
    """Energy distance (and its floor) of each stop index's state x_k against the teacher's marginal at sigma_k."""
    schedule = rtdmd.student_schedule(world, 4)
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    out = []
    with torch.no_grad():
        for k in range(1, 5):
            x = rtdmd.sample_student(world, cond, schedule, 0.9, noise, stop=k, generator=torch.Generator().manual_seed(k))
            ref = world.renoise(world.mixture.sample(n, gen), schedule[k], torch.randn(n, 2, generator=gen))
            out.append((toy2d.energy_distance(x, ref), toy2d.energy_floor(ref, n, n)))
    return out


def test_stop_indices_after_the_cold_start(cold_start):
    """Item 5 of the issue: RTDMD's fake score is not indexed by the stop index, so at a level sigma_t it fits the mixture
    of the ambient marginals of every stop index k with sigma_k < sigma_t (as DMD2's fits the mixture of its steps).
    Measured after the cold start (seeds 0 / 1 / 2 / 3, energy distance to the teacher's marginal at sigma_k):
        state at sigma_1 = 0.75: 0.0036 / 0.0039 / 0.0030 / 0.0037   (untrained 4-step CPS: 0.0057)
        state at sigma_2 = 0.50: 0.035  / 0.039  / 0.034  / 0.031    (untrained: 0.068)
        state at sigma_3 = 0.25: 0.019  / 0.022  / 0.014  / 0.014    (untrained: 0.068)
        clean output:            0.0020 / 0.014  / 0.0043 / 0.0024   (untrained: 0.026)
    The intermediate states improve but stay 10-25 floors from their marginals while the output reaches 1.5-10 floors:
    the later steps compensate for the earlier ones, which the mixture fake cannot tell apart. The output is what
    the method delivers and what stage 2 starts from, so no fix is needed here; a fake per stop index (issue 10's fix
    in dmd.py) would be needed to make every state match. Asserted on seed 0: output within 4 floors, the sigma_2
    state more than 10 floors away."""
    dist = state_distances(cold_start)
    (out_ed, out_floor), (mid_ed, mid_floor) = dist[3], dist[1]
    assert out_ed <= 4 * out_floor, dist
    assert mid_ed >= 10 * mid_floor, dist


def stage2_snapshots(cold_start, tmp_path, monkeypatch, every, **over):
    """Stage 2 from the cold start with an evaluation (4000 samples, the EMA student) every `every` updates; returns
    [(update, mean reward, energy distance to p~, its floor, weight temperature, shift temperature, modes, off)]."""
    world = copy.deepcopy(cold_start)
    snaps, evaluate = [], rtdmd.evaluate

    def recording(world_, schedule, eta, n, seed, beta=None):
        samples, cond, m = evaluate(world_, schedule, eta, n, seed, beta)
        tau_w, tau_shift, _ = temperatures(samples, torch.ones(samples.shape[0]), world.mixture, world.reward_fn.direction,
                                           BETA)
        snaps.append((m["mean_reward"], m["energy_distance_tilted"], m["energy_floor_tilted"], tau_w, tau_shift,
                      m["modes_covered"], m["off_manifold"]))
        return samples, cond, m

    monkeypatch.setattr(rtdmd, "evaluate", recording)
    rtdmd.main(rtdmd.Args(output_dir=str(tmp_path), progress=False, seed=0, cold_steps=0, eval_every=every,
                          eval_samples=4000, **over), world=world)
    return [(every * i, *s) for i, s in enumerate(snaps)]


def test_natural_recipe_settles_at_the_surrogate_fixed_point_not_at_p_tilde(cold_start, tmp_path, monkeypatch,
                                                                            natural_fixed_point, world):
    """The natural recipe's student (seed 0) goes to J's minimiser, not to p~. The within-mode shift settles first: its
    temperature, averaged over the snapshots every 50 updates from 200 to 400 (constant lr 3e-4: it oscillates), is
    nearer the fixed point's 1.96 than p~'s 1 (the assertion; measured 2.20 / 2.05 / 2.90 / 2.05 / 1.57, mean 2.15).
    The mode weights are slower (weight temperature 0.46-0.69 at 200-400 updates, reward 0.97-1.33) and are reported,
    not asserted: over 800 updates (2000 samples per snapshot, every 100 from 300) reward 1.33-1.67 (fixed point
    1.572, p~ 1.458), weight temperature 0.67-1.40 (fixed point 1.063), shift 1.5-2.7, energy distance to p~
    0.009-0.029; seeds 0 / 1 after 600 updates: reward 1.55 / 1.69, weight temperature 1.10 / 1.40, shift 1.78 / 2.10."""
    snaps = stage2_snapshots(cold_start, tmp_path, monkeypatch, 50, stage2_recipe="natural", rl_steps=400)
    late = torch.tensor([s[1:] for s in snaps if s[0] >= 200], dtype=torch.float64)
    tau_shift = float(late[:, 4].mean())
    print("natural snapshots", snaps)
    assert abs(tau_shift - 1.96) < abs(tau_shift - 1.0), snaps


def test_exact_tilt_option_reaches_p_tilde(cold_start, tmp_path):
    """--dm-target tilted (beyond the paper): stage 2 is AC-DMD against the exact tilted teacher's noisy marginals
    (p~ is a Gaussian mixture again), whose KL at every level is minimised by p~ itself. With the natural recipe's DM
    path (all K steps; the final-step path cannot move mass between modes: weight temperature 0.13 / 0.17 after 600
    updates, seeds 0 / 1) the student reaches p~ up to the oscillation of a constant-lr run: after 600 updates energy
    distance 2.4-4.6 floors (seed 0, two runs) and 11 floors (seed 1), mean reward 1.43-1.48 against p~'s 1.458
    (the natural recipe's fixed point: 1.572). Asserted on seed 0: the within-mode shift temperature is nearer p~'s 1
    than the surrogate fixed point's 1.96 (measured 0.6-1.0: the target's bias is gone), and the energy distance to p~
    is within 10 floors and 100x below the distance to p."""
    samples, m = stage2(cold_start, tmp_path, dm_target="tilted", stage2_recipe="natural", rl_steps=600)
    world = cold_start
    _, tau_shift, _ = temperatures(samples, torch.ones(samples.shape[0]), world.mixture, world.reward_fn.direction, BETA)
    print("tilted", tau_shift, m)
    assert abs(tau_shift - 1.0) < abs(tau_shift - 1.96), (tau_shift, m)
    assert m["energy_distance_tilted"] <= 10 * m["energy_floor_tilted"], m
    assert m["energy_distance_tilted"] * 100 <= m["energy_distance"], m


def test_paper_recipe_on_the_toy_tilts_without_a_fixed_point(cold_start, tmp_path, monkeypatch):
    """The paper's stage 2 (the default: DM on the last step only, global-std advantages, the mse log-probability,
    the L_det hinge) at the toy scales (DM 1, L_det 0.1, lr 2e-5), seed 0, snapshots every 200 updates:
      * it tilts toward p~: reward up at every snapshot, every mode of the ring still covered at 600, off the manifold
        no more than 0.15 (cold start 0.05), energy distance to p~ at 600 below a tenth of its start;
      * it has no fixed point: the weight temperature grows at every snapshot (the last step's DM cannot move mass
        between modes, so nothing holds the mode weights against the policy gradient). Measured over 1000 updates
        (seeds 0 / 1): weight temperature 0.08 -> 0.77 at 700 -> 3.6 at 1000, modes 8 -> 3, closest approach to p~
        0.047 / 0.061 at 600, then away again (0.40 / 0.47 at 1000); at lr 3e-5 the same path 1.5x faster. This run:
        reward 0.41 / 0.93 / 1.36, weight temperature 0.17 / 0.39 / 0.62, shift 1.25 / 2.88 / 3.89 (p~: 1 and 1),
        energy distance to p~ 0.91 -> 0.046 (53 floors), off-manifold 0.09, 8 modes at 600.
    NOT reproduced at the authors' weights (DM 0.001, L_det 1e-4): the policy gradient alone drives the toy off the
    manifold (rewards 52 / 8, off-manifold 100%, seeds 0 / 1, at lr 3e-4)."""
    snaps = stage2_snapshots(cold_start, tmp_path, monkeypatch, 200, rl_steps=600)
    print("paper snapshots", snaps)
    reward, tau_w = [s[1] for s in snaps], [s[4] for s in snaps[1:]]
    assert all(b > a for a, b in zip(reward, reward[1:])), snaps
    assert all(b > a for a, b in zip(tau_w, tau_w[1:])), snaps
    last = snaps[-1]
    assert last[6] == 8 and last[7] <= 0.15 and last[2] <= snaps[0][2] / 10, snaps

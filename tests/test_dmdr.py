"""Tests of dmdr.py's pieces against exact / hand-computed values: the DynaRS and DynaDG schedules and the levels they
reach the network at, RT-DM's weights, the one student rollout (sde / ode) and the ode backward simulation, the RL
terms, stage 2's own rates and batch, the copies of dmd.py, bad input and non-finite rewards. The paper's claims on the
toy are in tests/test_dmdr_claims.py, the text-to-image presets in tests/test_dmdr_presets.py."""

import json
import math
from dataclasses import replace

import pytest
import torch

import dmd
import dmdr
import toy2d

SEED = 0


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), progress=False, seed=SEED, eval_samples=4000)
    base.update(kw)
    return dmdr.resolve_stage2(dmdr.resolve_defaults(dmdr.Args(**base)))


def build_world(args, **kw):
    torch.manual_seed(args.seed)
    return dmdr.make_world(args, "cpu") if not kw else toy2d.ToyWorld(seed=args.seed, **kw)


def perturb(world, role, scale=0.05, seed=0):
    """Move an adapter off its zero-initialised last layer (at init every role equals the teacher)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.params(role):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def optimisers(world, args):
    opt_g = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    return opt_g, torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0)


# =====================================================================================================
#                                  DynaRS and DynaDG schedules
# =====================================================================================================


def beta_cdf(a, b, x, grid=200_001):
    """CDF of Beta(a, b) at points x, by trapezoidal integration of the density on a fine float64 grid
    (error ~1e-8, far below the KS critical value ~3e-2)."""
    u = torch.linspace(0, 1, grid, dtype=torch.float64)
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    pdf = torch.exp((a - 1) * torch.log(u.clamp_min(1e-300)) + (b - 1) * torch.log((1 - u).clamp_min(1e-300)) - log_b)
    pdf[0] = 0.0 if a > 1 else pdf[1]
    pdf[-1] = 0.0 if b > 1 else pdf[-2]
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((pdf[1:] + pdf[:-1]) / 2, 0) / (grid - 1)])
    idx = (x.double().clamp(0, 1) * (grid - 1)).round().long()
    return cdf[idx]


def ks_statistic(samples, cdf):
    """Two-sided one-sample Kolmogorov-Smirnov statistic sup |F_n - F|."""
    x, _ = torch.sort(samples.double())
    n = x.shape[0]
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


# KS critical value at level alpha = 0.001 for n samples: sqrt(-ln(alpha / 2) / 2) / sqrt(n) = 1.949 / sqrt(n)
N_KS = 4000
KS_CRIT = math.sqrt(-math.log(0.001 / 2) / 2) / math.sqrt(N_KS)


@pytest.mark.parametrize("step, a, b", [(0, 4.0, 1.5), (250, 2.5, 1.25), (500, 1.0, 1.0), (900, 1.0, 1.0)])
def test_dynamic_renoise_level_distribution(step, a, b):
    """DynaRS at dynamic_steps = 500: Beta(4, 1.5) at step 0, Beta(2.5, 1.25) halfway (c = 1/2), U(0, 1) from 500 on;
    KS test at level 0.001 (critical value 0.031 for 4000 draws)."""
    torch.manual_seed(1)
    u = dmdr.dynamic_renoise_level(N_KS, step, 500, 4.0, 1.5)
    assert u.shape == (N_KS,) and bool(((u > 0) & (u < 1)).all())
    assert ks_statistic(u, lambda x: beta_cdf(a, b, x)) < KS_CRIT
    if step == 0:  # the test has power: the step-0 draws are far from U(0, 1) (KS distance of the two laws: 0.41)
        assert ks_statistic(u, lambda x: x) > 10 * KS_CRIT


def test_dynamic_renoise_level_off():
    """dynamic_steps = 0 switches the annealing off: U(0, 1) from the first step (the authors' dynamic step 0, SDXL)."""
    torch.manual_seed(3)
    u = dmdr.dynamic_renoise_level(100, 0, 0)
    torch.manual_seed(3)
    assert torch.equal(u, torch.rand(100))


@pytest.mark.parametrize("path, shift", [("flow", 1.0), ("flow", 3.0), ("flow", 5.0), ("vp", 1.0)])
def test_pre_shift_time_inverts_the_shift(path, shift):
    """world.sigma(pre_shift_time(world, u)) = sigma_max u: a level drawn unshifted reaches the network unshifted."""
    world = toy2d.ToyWorld(path=path, shift=shift)
    u = torch.linspace(1e-3, 1.0, 1001, dtype=torch.float64)
    assert torch.allclose(world.sigma(dmdr.pre_shift_time(world, u)), world.sigma_max * u, rtol=1e-12, atol=1e-15)


def test_dynars_levels_are_the_authors_unshifted_beta(tmp_path):
    """On a world with SD3's shift 3, the noise levels DynaRS feeds the network are the authors' sigma ~ Beta(4, 1.5)
    itself: mean 4 / 5.5 = 0.727 at step 0 (the old mapped-then-shifted draw: 0.871), and U(0.001, 1) after annealing,
    P[sigma < 0.3] = 0.299 (old: 0.11). Tolerances: 4.5 standard errors of 20000 draws (sd 0.18 and 0.29 for the
    means, sqrt(0.3 * 0.7 / 20000) = 0.0032 for the probability). Both the DMD renoise and the fake update use it."""
    args = make_args(tmp_path, dynamic_steps=100)
    world = toy2d.ToyWorld(shift=3.0)
    torch.manual_seed(0)
    for for_fake in (False, True):
        start = world.sigma(dmdr.renoise_times(args, world, 20000, 0, "cpu", for_fake))
        assert float(start.mean()) == pytest.approx(4 / 5.5, abs=4.5 * 0.18 / math.sqrt(20000))
        late = world.sigma(dmdr.renoise_times(args, world, 20000, 100, "cpu", for_fake))
        assert float((late < 0.3).double().mean()) == pytest.approx(0.3 - 0.001, abs=4.5 * 0.0032)
        assert float(late.min()) >= 1e-3 - 1e-7 and float(late.max()) <= 1.0
    off = replace(args, dyna_rs=False)  # --no-dyna-rs: DMD2's pre-shift U[0.02, 0.98], through the world's shift
    t = dmdr.renoise_times(off, world, 20000, 0, "cpu", for_fake=False)
    assert float(t.min()) >= 0.02 and float(t.max()) <= 0.98
    # shifted by 3: E[3t / (1 + 2t)] over U[0.02, 0.98] = [1.5 t - 0.75 ln(1 + 2t)] / 0.96 = 0.683 (sd < 0.3 per draw)
    exact = (1.5 * 0.96 - 0.75 * math.log((1 + 2 * 0.98) / (1 + 2 * 0.02))) / 0.96
    assert float(world.sigma(t).mean()) == pytest.approx(exact, abs=4.5 * 0.3 / math.sqrt(20000))


def test_lora_scale_r_schedule():
    """DynaDG: lora_scale_r0 at step 0, r0 / 2 halfway, 0 at and after dynamic_steps, never increasing."""
    r0, d = 0.5, 400
    assert dmdr.lora_scale_r(0, r0, d) == r0
    assert dmdr.lora_scale_r(d // 2, r0, d) == pytest.approx(r0 / 2, abs=1e-12)
    assert dmdr.lora_scale_r(d, r0, d) == 0.0 and dmdr.lora_scale_r(3 * d, r0, d) == 0.0
    assert dmdr.lora_scale_r(5, r0, 0) == 0.0  # dynamic_steps = 0: DynaDG off
    values = [dmdr.lora_scale_r(s, r0, d) for s in range(2 * d)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert all(b < a for a, b in zip(values[:d], values[1:d]))  # strictly decreasing while annealing


def test_guidance_jitter(tmp_path):
    """The real score's CFG: U(g - j, g + j) per generator update (the authors' 7 +- 0.5); exactly g without jitter,
    and then no random number is drawn (the toy's runs keep their random stream)."""
    args = make_args(tmp_path, guidance_scale=7.0, guidance_jitter=0.5)
    torch.manual_seed(0)
    g = torch.tensor([dmdr.real_guidance(args) for _ in range(4000)])
    assert float(g.min()) >= 6.5 and float(g.max()) <= 7.5
    assert float(g.mean()) == pytest.approx(7.0, abs=4.5 * 0.289 / math.sqrt(4000))  # sd of U(-0.5, 0.5): 0.289
    assert ks_statistic((g - 6.5).double(), lambda x: x) < KS_CRIT
    plain = replace(args, guidance_jitter=0.0)
    state = torch.get_rng_state()
    assert dmdr.real_guidance(plain) == 7.0 and torch.equal(state, torch.get_rng_state())


# =====================================================================================================
#                                           RT-DM weights
# =====================================================================================================


def test_reward_tilt_weights_by_hand():
    r = torch.tensor([1.0, -1.0, 2.0, 0.0])
    std = math.sqrt(sum((v - 0.5) ** 2 for v in r.tolist()) / 4)  # population std of the batch, sqrt(1.25)
    e = [math.exp(v / std) for v in r.tolist()]
    expected = [v / (sum(e) / 4) for v in e]  # renormalised to mean 1
    got = dmdr.reward_tilt_weights(r)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(got.mean()) == pytest.approx(1.0, rel=1e-6)
    e2 = [math.exp(2 * v / std) for v in r.tolist()]  # beta = 2 doubles the exponent
    assert dmdr.reward_tilt_weights(r, 2.0).tolist() == pytest.approx([v / (sum(e2) / 4) for v in e2], rel=1e-6)
    rms = math.sqrt((1 + 1 + 4 + 0) / 4)  # paper-literal: the uncentred RMS
    e3 = [math.exp(v / rms) for v in r.tolist()]
    assert dmdr.reward_tilt_weights(r, norm="rms").tolist() == pytest.approx([v / (sum(e3) / 4) for v in e3], rel=1e-6)


def test_reward_tilt_weights_invariances():
    """std form: invariant to r -> r + c and r -> a r (a > 0), as promised; rms form: scale-free but not offset-free
    (CLIP-like rewards, mean 0.2 and std 0.01, give it weights within 0.93-1.07, a near no-op, and the std form the
    same weights as for the centred reward). A constant reward gives exactly 1 in both (plain DMD)."""
    torch.manual_seed(0)
    r = torch.randn(64, dtype=torch.float64)
    w = dmdr.reward_tilt_weights(r)
    for c, a in ((5.0, 1.0), (-3.0, 1.0), (0.0, 0.01), (0.2, 0.01), (100.0, 7.0)):
        assert torch.allclose(dmdr.reward_tilt_weights(a * r + c), w, rtol=1e-9, atol=1e-12), (c, a)
    assert torch.allclose(dmdr.reward_tilt_weights(40 * r, norm="rms"), dmdr.reward_tilt_weights(r, norm="rms"), rtol=1e-9)
    clip_like = 0.2 + 0.01 * r
    w_rms = dmdr.reward_tilt_weights(clip_like, norm="rms")
    # exactly: centred log-weights of the rms form = (std / rms) x those of the std form, here 0.05: a 20x weaker tilt
    ratio = float(clip_like.std(unbiased=False) / clip_like.pow(2).mean().sqrt())
    lw_rms, lw_std = w_rms.log() - w_rms.log().mean(), w.log() - w.log().mean()
    assert ratio < 0.06 and torch.allclose(lw_rms, ratio * lw_std, rtol=1e-9, atol=1e-12)
    assert float(w_rms.min()) > 0.8 and float(w_rms.max()) < 1.2  # a near no-op (for this batch 0.86-1.11)
    assert float(w.max() / w.min()) > 20  # the std form spans the same batch widely (exp of +-2.5 std)
    for const in (torch.zeros(5), torch.full((7,), -3.0), torch.full((64,), 0.7)):
        for norm in dmdr.RT_DM_NORMS:
            assert torch.equal(dmdr.reward_tilt_weights(const, norm=norm), torch.ones_like(const))


def test_rt_dm_with_constant_reward_is_plain_dmd(tmp_path, monkeypatch):
    """With a constant reward every RT-DM weight is 1, so three stage-1 updates with RT-DM equal the updates without it
    (same seed, same draws), parameter for parameter, with either sampler."""
    monkeypatch.setattr(toy2d.ToyWorld, "reward", lambda self, x0, cond: torch.full((x0.shape[0],), 0.7))
    for sampler in dmdr.SAMPLERS:
        args = make_args(tmp_path, batch_size=64, fake_updates_per_step=2, student_steps=2, sampler=sampler)
        updated = []
        for rt_dm in (True, False):
            a = replace(args, rt_dm=rt_dm)
            world = build_world(a)
            sigmas = dmdr.student_sigmas(world, a.student_steps)
            opt_g, opt_f = optimisers(world, a)
            torch.manual_seed(11)
            for step in range(3):
                dmdr.stage1_step(world, a, sigmas, step, opt_g, opt_f)
            updated.append([p.detach().clone() for p in world.params("generator")])
        assert any(float(p.abs().max()) > 0 for p in updated[0][-2:])  # the update did move the (zero-init) last layer
        for p, q in zip(*updated):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_rt_dm_weights_scale_the_per_sample_gradient(tmp_path):
    """The RT-DM loss's gradient w.r.t. each sample is its weight times the plain DMD gradient (eq. 4)."""
    args = make_args(tmp_path)
    world = build_world(args)
    perturb(world, "fake")  # a fake score that differs from the teacher (at init the two are equal: zero gradient)
    x0 = torch.randn(6, 2, requires_grad=True)
    cond = world.sample_cond(6)
    w = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.4, 1.0])
    grads = []
    for weights in (None, w):
        torch.manual_seed(5)
        (g,) = torch.autograd.grad(dmdr.distribution_matching_loss(world, args, x0, cond, 0, weights), x0)
        grads.append(g)
    assert grads[0].abs().min() > 0
    # dmd_loss forms x - (x - grad) in float32: an absolute rounding error ~ 2 eps32 |x| / numel ~ 1e-7 per entry
    assert torch.allclose(grads[1], w[:, None] * grads[0], rtol=0, atol=1e-7)


def test_distribution_matching_loss_uses_dynadg_and_the_fake_scale(tmp_path):
    """The one DM-loss wrapper: real score = teacher + lora_scale_r(step) * fake adapter, fake score at lora_scale_f.
    Its gradient equals dmd.py's DMD2 step computed by hand from those two predictions at the same draws."""
    args = make_args(tmp_path, dynamic_steps=100, lora_scale_f=2.0, lora_scale_r0=0.5)
    world = build_world(args)
    perturb(world, "fake")
    x0 = torch.randn(16, 2, requires_grad=True)
    cond = world.sample_cond(16)
    for step in (0, 50, 150):
        torch.manual_seed(7)
        (g,) = torch.autograd.grad(dmdr.distribution_matching_loss(world, args, x0, cond, step), x0)
        torch.manual_seed(7)
        t = dmdr.renoise_times(args, world, 16, step, "cpu", for_fake=False)
        sigma = world.sigma(t)
        x_t = world.renoise(x0.detach(), sigma, torch.randn(16, 2))
        scale = dmdr.lora_scale_r(step, 0.5, 100)
        real = world.x0("fake", x_t, sigma, cond, adapter_scale=scale) if scale > 0 else world.x0("teacher", x_t, sigma, cond)
        fake = world.x0("fake", x_t, sigma, cond, adapter_scale=2.0)
        expected = dmd.dmd_grad(x0.detach(), real, fake) / x0.numel()
        assert torch.allclose(g, expected, rtol=1e-5, atol=1e-8), step


# =====================================================================================================
#                          the one rollout, and the ode backward simulation
# =====================================================================================================


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_rollout_sde_is_dmd2s_sampler_and_ode_is_the_euler_ddim_step(tmp_path, path):
    """sde with a generator: exactly dmd.py's sample_student (the same draws). ode: deterministic; each step is the
    Euler step x + (sigma' - sigma) v of the flow ODE (v = (x - x0) / sigma), on VP the DDIM step
    alpha' x0 + sigma' (x - alpha x0) / sigma; the states are the rollout's inputs."""
    args = make_args(tmp_path, toy_path=path)
    world = build_world(args)
    perturb(world, "generator", 0.1)
    sigmas = dmdr.student_sigmas(world, 4)
    cond = world.sample_cond(64)
    noise = world.noise(cond, torch.Generator().manual_seed(1))
    final, _ = dmdr.rollout(world, cond, sigmas, noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(final, dmd.sample_student(world, cond, sigmas, noise, generator=torch.Generator().manual_seed(2)))
    final_ode, states = dmdr.rollout(world, cond, sigmas, noise, sampler="ode")
    assert torch.equal(final_ode, dmdr.rollout(world, cond, sigmas, noise, sampler="ode")[0])
    assert len(states) == 4 and torch.equal(states[0], noise)
    with torch.no_grad():
        x = noise
        for k in range(3):
            x0 = world.x0("generator", x, sigmas[k], cond)
            if path == "flow":
                x = x + (sigmas[k + 1] - sigmas[k]) * (x - x0) / sigmas[k]
            else:
                x = world.alpha(sigmas[k + 1]) * x0 + sigmas[k + 1] * (x - world.alpha(sigmas[k]) * x0) / sigmas[k]
            assert torch.allclose(states[k + 1], x, rtol=1e-5, atol=1e-6)
        assert torch.allclose(final_ode, world.x0("generator", x, sigmas[3], cond), rtol=1e-5, atol=1e-6)


def test_ode_backward_simulation_renoises_the_final_sample(tmp_path):
    """The authors' ode mode: the generator's input is the ode rollout's FINAL sample re-noised with fresh noise to a
    student level drawn per sample; the fake trains on those final samples; RT-DM scores them."""
    args = make_args(tmp_path, student_steps=4, sampler="ode")
    world = build_world(args)
    perturb(world, "generator", 0.1)
    sigmas = dmdr.student_sigmas(world, 4)
    cond = world.sample_cond(512)
    torch.manual_seed(3)
    x0, k, complete = dmdr.backward_simulation(world, args, cond, sigmas)
    torch.manual_seed(3)
    noise = world.noise(cond)
    final, _ = dmdr.rollout(world, cond, sigmas, noise, sampler="ode")
    kk = torch.randint(4, (512,))
    sigma = torch.tensor(sigmas)[kk]
    x_in = world.renoise(final, sigma, torch.randn_like(final))
    assert torch.equal(complete, final) and torch.equal(k, kk)
    assert torch.allclose(x0, world.x0("generator", x_in, sigma, cond), rtol=1e-6, atol=1e-6) and x0.requires_grad
    assert set(k.tolist()) == {0, 1, 2, 3}  # every level is drawn (512 draws: missing one has probability 4 (3/4)^512)
    torch.manual_seed(4)
    fake_x = dmdr.fake_training_samples(world, args, cond, sigmas)
    torch.manual_seed(4)
    assert torch.equal(fake_x, dmdr.rollout(world, cond, sigmas, world.noise(cond), sampler="ode")[0])


def test_sde_backward_simulation_completes_the_rollout(tmp_path):
    """sde: dmd.py's generator_sample (one step k for the batch), and RT-DM's complete rollout continues from its x0
    with fresh noise through the later steps (the last step's x0 is its own complete rollout)."""
    args = make_args(tmp_path, student_steps=3, sampler="sde")
    world = build_world(args)
    perturb(world, "generator", 0.1)
    sigmas = dmdr.student_sigmas(world, 3)
    cond = world.sample_cond(32)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x0, k, complete = dmdr.backward_simulation(world, args, cond, sigmas)
        torch.manual_seed(seed)
        x0_ref, k_ref = dmd.generator_sample(world, cond, sigmas, world.noise(cond))
        assert k == k_ref and torch.equal(x0, x0_ref)
        if k == 2:
            assert torch.equal(complete, x0.detach())
        else:
            x = world.renoise(x0.detach(), sigmas[k + 1], torch.randn_like(x0))
            assert torch.equal(complete, dmdr.rollout(world, cond, sigmas, x, start=k + 1)[0])
        seen.add(k)
    assert seen == {0, 1, 2}


def test_one_step_student_sde_and_ode_are_the_same_algorithm(tmp_path):
    """K = 1: DMD2's sampler and the ode backward simulation are the same algorithm. ode's generator input is its final
    sample re-noised to sigma = 1, i.e. fresh pure noise, as sde's is; both fakes train on G(noise); both evaluate G(noise).
    (The random streams differ: ode draws a level index per sample.)"""
    args = make_args(tmp_path, student_steps=1, sampler="ode")
    world = build_world(args)
    perturb(world, "generator", 0.1)
    sigmas = dmdr.student_sigmas(world, 1)
    assert sigmas == [1.0]
    cond = world.sample_cond(256)
    torch.manual_seed(5)
    x0, k, complete = dmdr.backward_simulation(world, args, cond, sigmas)
    torch.manual_seed(5)
    noise = world.noise(cond)
    final = world.x0("generator", noise, 1.0, cond)
    torch.randint(1, (256,))
    eps = torch.randn_like(final)
    assert torch.equal(world.renoise(final, torch.ones(256), eps), eps)  # sigma = 1: the input is the fresh noise itself
    assert torch.equal(complete, final) and bool((k == 0).all())
    assert torch.allclose(x0, world.x0("generator", eps, 1.0, cond), rtol=1e-6, atol=1e-7)
    for sampler in dmdr.SAMPLERS:
        torch.manual_seed(6)
        x = dmdr.fake_training_samples(world, replace(args, sampler=sampler), cond, sigmas)
        torch.manual_seed(6)
        assert torch.allclose(x, world.x0("generator", world.noise(cond), 1.0, cond), rtol=1e-6, atol=1e-7), sampler
        samples, _, _ = dmdr.evaluate_student(world, replace(args, sampler=sampler), sigmas, 500, 3)
        if sampler == "sde":
            reference = samples
    assert torch.allclose(samples, reference, rtol=1e-6, atol=1e-7)


# =====================================================================================================
#                                       RL terms, by hand
# =====================================================================================================


def test_refl_hinge_by_hand():
    """relu(margin - r): samples above the margin get no gradient, those below get -1/n; inf / None: -mean r."""
    r = torch.tensor([0.5, 2.0, 3.5, -1.0], requires_grad=True)
    loss = dmdr.refl_hinge(r, 3.0)
    assert loss.item() == pytest.approx((2.5 + 1.0 + 0.0 + 4.0) / 4)
    (g,) = torch.autograd.grad(loss, r)
    assert g.tolist() == [-0.25, -0.25, 0.0, -0.25]
    for margin in (None, math.inf):
        (g,) = torch.autograd.grad(dmdr.refl_hinge(r, margin), r)
        assert g.tolist() == [-0.25] * 4


def test_dpo_loss_by_hand():
    # one pair (a winner and a loser): errors e_w = 1.0 vs ref 1.5 (policy fits the winner better), e_l = 2.0 vs ref 1.0
    # logit = -beta [(1.0 - 1.5) - (2.0 - 1.0)] = -0.5 * (-1.5) = 0.75; loss = -log sigmoid(0.75) = log(1 + e^-0.75)
    got = dmdr.dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.0]), beta=0.5)
    assert float(got) == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    # policy == reference: log 2 whatever the errors
    e = torch.tensor([0.3, 4.0])
    assert float(dmdr.dpo_loss(e, e.flip(0), e, e.flip(0), beta=3.0)) == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_pairs_and_the_reference_swap(tmp_path):
    """dpo_batch: each group's winner is its best rollout and the loser its worst; with the reference equal to the current
    generator the DPO loss is exactly log 2; the generator's parameters are restored after the reference's pass, a
    different reference changes the loss, and the policy branch carries the gradient."""
    args = make_args(tmp_path, student_steps=4, rl="dpo", group_size=4)
    world = build_world(args)
    perturb(world, "generator", 0.1)
    sigmas = dmdr.student_sigmas(world, 4)
    before = [p.detach().clone() for p in world.params("generator")]
    cond = world.sample_cond(4).repeat_interleave(4)  # 4 groups of 4
    torch.manual_seed(1)
    pairs, reward = dmdr.dpo_batch(world, args, cond, sigmas, before)
    r = reward.reshape(4, 4)
    with torch.no_grad():
        assert torch.allclose(world.reward(pairs["x_w"], pairs["cond"]), r.max(1).values, rtol=0, atol=1e-6)
        assert torch.allclose(world.reward(pairs["x_l"], pairs["cond"]), r.min(1).values, rtol=0, atol=1e-6)
    loss_same = dmdr.dpo_chunk_loss(world, args, pairs, sigmas, slice(0, 4))
    assert loss_same.item() == pytest.approx(math.log(2), abs=1e-6)
    torch.manual_seed(1)
    other, _ = dmdr.dpo_batch(world, args, cond, sigmas, [torch.zeros_like(p) for p in before])
    for p, q in zip(world.params("generator"), before):
        assert torch.equal(p, q)
    assert torch.equal(other["x_w"], pairs["x_w"])  # the same rollouts: only the reference differs
    loss_other = dmdr.dpo_chunk_loss(world, args, other, sigmas, slice(0, 4))
    assert abs(loss_other.item() - math.log(2)) > 1e-3
    loss_other.backward()  # the policy branch carries the gradient
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in world.params("generator"))


def test_group_reinforce_by_hand():
    """GRPO's group-normalised advantages, and the loss whose gradient is -A_i / (n S) per log-probability: exactly
    GRPO's gradient at the rollout's own policy (ratio 1), where PPO's clip is inactive, which is why there is none."""
    adv = dmdr.group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2, eps=0.0)[:2]  # mean 2, population std 1
    assert adv.tolist() == [-1.0, 1.0]
    assert dmdr.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, eps=1e-6)[2:].tolist() == [0.0, 0.0]
    logp = torch.tensor([[0.3, 0.1], [-0.2, 0.4]], requires_grad=True)
    (g,) = torch.autograd.grad(dmdr.reinforce_loss(logp, adv), logp)
    assert torch.allclose(g, torch.tensor([[0.25, 0.25], [-0.25, -0.25]]))
    for clip in (1e-4, 0.2):  # PPO's clipped objective at ratio 1 has the same gradient, for any clip
        ratio = torch.exp(logp - logp.detach())
        ppo = -torch.minimum(ratio * adv[:, None], ratio.clamp(1 - clip, 1 + clip) * adv[:, None]).mean()
        (g_ppo,) = torch.autograd.grad(ppo, logp)
        assert torch.allclose(g_ppo, g)


def test_transition_logprob_is_the_sampler_gaussian(tmp_path):
    """The DMD2 sampler's renoise step x' = alpha(s') G(x, s) + s' eps has log-density N(alpha G, s'^2 I)."""
    args = make_args(tmp_path)
    world = build_world(args)
    x, cond = torch.randn(5, 2), world.sample_cond(5)
    x_next = torch.randn(5, 2)
    got = dmdr.transition_logprob(world, x, x_next, 0.75, 0.5, cond)
    mean = world.alpha(0.5) * world.x0("generator", x, 0.75, cond)
    ref = torch.distributions.Normal(mean, 0.5).log_prob(x_next).sum(-1)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rl", ["dpo", "grpo"])
def test_policy_losses_raise_the_reward(tmp_path, rl):
    """DPO and GRPO push the right way: 20 RL-only updates from the teacher-initialised 4-step student raise the mean
    reward of 4000 evaluation samples by more than 0.5 (over 15 standard errors of 0.032). (A teacher-initialised
    1-step student maps every noise to the mixture mean: its rollouts are all equal, so DPO's pairs carry nothing.)"""
    steps = 4
    args = make_args(tmp_path, stage1_steps=0, stage2_steps=20, batch_size=64, rl=rl, dmd=False, dynamic_steps=0,
                     eval_every=20, student_steps=steps)
    run = dmdr.main(args)
    before, after = run["history"][0]["mean_reward"], run["final"]["mean_reward"]
    print(f"{rl}: mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.5


# =====================================================================================================
#                               stage 2's own rates and batch, world options
# =====================================================================================================


def test_stage2_has_its_own_batch_size_and_learning_rates(tmp_path, monkeypatch):
    """The authors' stage 2 runs at another batch size and lower rates (SD3-M: 4 and 5e-7 / 2e-7): the batch every
    update draws, and the optimisers' rates, switch at the first stage-2 step; unset, they stay stage 1's."""
    seen = []
    real_step = dmdr.generator_update

    def spy(world, args, opt):
        seen.append((opt.param_groups[0]["lr"], len(world._last_cond)))
        return real_step(world, args, opt)

    real_cond = toy2d.ToyWorld.sample_cond

    def sample_cond(self, n, generator=None):
        self._last_cond = real_cond(self, n, generator)
        return self._last_cond

    monkeypatch.setattr(dmdr, "generator_update", spy)
    monkeypatch.setattr(toy2d.ToyWorld, "sample_cond", sample_cond)
    args = make_args(tmp_path, stage1_steps=2, stage2_steps=2, batch_size=32, stage2_batch_size=8, lr_generator=1e-3,
                     stage2_lr_generator=2e-4, stage2_lr_fake=3e-4, eval_samples=100, eval_every=100)
    dmdr.main(args)
    assert seen == [(1e-3, 32), (1e-3, 32), (2e-4, 8), (2e-4, 8)]
    plain = dmdr.resolve_stage2(dmdr.resolve_defaults(dmdr.Args(batch_size=32, lr_fake=5e-4)))
    assert (plain.stage2_batch_size, plain.stage2_lr_fake, plain.stage2_lr_generator) == (32, 5e-4, 1e-3)


def test_configure_world_shift_moves_the_student_levels_only(tmp_path):
    """--shift (DMDR SD3.5-L: 5) sets the student's levels, 5 t / (1 + 4 t) for t = 1, .75, .5, .25 (the authors'
    {1.0, .938, .834, .626}); DynaRS levels stay unshifted."""
    args = make_args(tmp_path, shift=5.0, student_steps=4)
    world = dmdr.configure_world(build_world(args), args)
    assert dmdr.student_sigmas(world, 4) == pytest.approx([1.0, 0.9375, 0.8333333, 0.625], abs=1e-6)
    torch.manual_seed(0)
    u = dmdr.dynamic_renoise_level(1000, 0, args.dynamic_steps).clamp(min=1e-3)
    torch.manual_seed(0)
    assert torch.allclose(world.sigma(dmdr.renoise_times(args, world, 1000, 0, "cpu", False)), u, atol=1e-6)


class _StubHPS:
    """A stand-in for t2i.rewards.HPSv2Scorer's text side (the hpsv2 package is optional): a bag-of-characters encoder."""

    def __init__(self, prompts):
        from t2i.rewards import HPSv2Scorer

        self.prompts = prompts
        self.tokenizer = lambda texts: torch.tensor([[float(len(t)), float(t.count(" "))] for t in texts])
        self.model = torch.nn.Module()
        self.model.dummy = torch.nn.Parameter(torch.zeros(1))
        self.model.encode_text = lambda tok, normalize=True: torch.nn.functional.normalize(tok, dim=-1)
        self.text_features = HPSv2Scorer.text_features.__get__(self)
        self.set_text_prefix = HPSv2Scorer.set_text_prefix.__get__(self)
        self.text = self.text_features(prompts)


def test_hps_prefix_changes_the_hps_text_only():
    """--hps-prefix: the hpsv2 term scores against "Realistic photo <prompt>" (the authors' ReFL), the other reward
    terms keep the plain prompt; without an hpsv2 term (or on the toy) it does nothing."""
    prompts = ["a cat", "two dogs on a sofa", ""]
    hps = _StubHPS(prompts)
    plain = hps.text.clone()
    other = object()

    class World:
        reward_fn = type("R", (), {"models": {"hpsv2": hps, "clip": other}})()

    dmdr.set_hps_prefix(World, "Realistic photo")
    expected = hps.text_features([f"Realistic photo {p}" for p in prompts])
    assert torch.equal(hps.text, expected) and not torch.equal(hps.text, plain)
    assert World.reward_fn.models["clip"] is other
    hps.set_text_prefix("")
    assert torch.equal(hps.text, plain)
    dmdr.set_hps_prefix(toy2d.ToyWorld(), "Realistic photo")  # the toy has no reward models: nothing to do


# =====================================================================================================
#                                      copies of dmd.py agree
# =====================================================================================================


def test_copies_match_dmd(tmp_path):
    args = make_args(tmp_path)
    world = build_world(args)
    x = torch.randn(32, 2, requires_grad=True)
    x0_real, x0_fake = torch.randn(32, 2), torch.randn(32, 2)
    assert torch.equal(dmdr.dmd_grad(x, x0_real, x0_fake), dmd.dmd_grad(x, x0_real, x0_fake))
    grad = dmd.dmd_grad(x, x0_real, x0_fake).detach()
    la, lb = dmdr.dmd_loss(x, grad), dmd.dmd_loss(x, grad)
    (ga,) = torch.autograd.grad(la, x)
    (gb,) = torch.autograd.grad(lb, x)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    t, cond, x0 = torch.rand(32).clamp(min=1e-3), world.sample_cond(32), torch.randn(32, 2)
    out = []
    for module in (dmdr, dmd):
        torch.manual_seed(2)
        loss = module.fake_score_loss(world, x0, cond, t, adapter_scale=2.0)
        out.append((loss, torch.autograd.grad(loss, world.params("fake"))))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    # the DMDR DM loss with DynaDG and DynaRS off and the fake score at scale 1 is DMD2's dmd_generator_loss
    plain = replace(args, dyna_dg=False, dyna_rs=False, lora_scale_f=1.0)
    out = []
    for fn in (lambda: dmdr.distribution_matching_loss(world, plain, x, cond, 0),
               lambda: dmd.dmd_generator_loss(world, x, cond, 0.02 + 0.96 * torch.rand(32), 1.0)):
        torch.manual_seed(4)
        loss = fn()
        out.append((loss, torch.autograd.grad(loss, x)[0]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# =====================================================================================================
#                                  bad input and non-finite rewards
# =====================================================================================================


@pytest.mark.parametrize("kw, message", [
    (dict(rl="ppo"), "valid RL losses: refl, dpo, grpo, none"),
    (dict(sampler="euler"), "valid samplers: sde, ode"),
    (dict(rt_dm_norm="l2"), "valid: std, rms"),
    (dict(lambda_rl=-0.1), "lambda_rl"),
    (dict(dyna_rs_a=0.0), "dyna_rs_a"),
    (dict(dyna_rs_b=-1.0), "dyna_rs_b"),
    (dict(dynamic_steps=-1), "dynamic_steps"),
    (dict(stage2_lr_fake=0.0), "stage2_lr_fake"),
    (dict(stage2_batch_size=0), "stage2_batch_size"),
    (dict(guidance_jitter=-0.5), "guidance_jitter"),
    (dict(shift=0.0), "shift"),
    (dict(shift=3.0, toy_path="vp"), "flow worlds"),
    (dict(refl_margin=float("nan")), "refl_margin"),
    (dict(rl="grpo", group_size=7), "group_size"),
    (dict(rl="grpo", batch_size=64, stage2_batch_size=12), "group_size"),
    (dict(rl="grpo", student_steps=1, batch_size=64), "student_steps >= 2"),
    (dict(rl="none", dmd=False), "trains nothing"),
])
def test_bad_input_fails_before_training(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        dmdr.main(make_args(tmp_path, **kw))
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_nan_reward_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    """A reward that turns NaN mid-run stops it, naming the step; the last good checkpoint stays loadable."""
    calls = {"n": 0}
    real_reward = toy2d.ToyWorld.reward

    def flaky_reward(self, x0, cond):
        calls["n"] += 1  # calls 1-13: evaluation at 0, steps 1-5, evaluation at 5, steps 6-10, evaluation at 10
        r = real_reward(self, x0, cond)
        return torch.full_like(r, float("nan")) if calls["n"] > 13 else r

    monkeypatch.setattr(toy2d.ToyWorld, "reward", flaky_reward)
    args = make_args(tmp_path, stage1_steps=20, stage2_steps=5, batch_size=32, eval_every=5, eval_samples=200,
                     fake_updates_per_step=1, run_name="nan")
    with pytest.raises(FloatingPointError, match=r"reward is nan at step 11 \(stage 1\)"):
        dmdr.main(args)
    ckpt = tmp_path / "nan" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 10
    world = build_world(args)
    world.load("generator", ckpt)
    world.load("fake", ckpt)

"""Tests of dmdr.py: its schedules and losses against exact / hand-computed values, its copies of dmd.py, bad input,
and three claims of the DMDR paper reproduced on the toy world (seeded, small budgets).

Reference numbers used in the claims' thresholds (ring8 teacher: 8 modes of std s on a circle of radius 2; linear
reward r = x_1; the numbers below hold for any s <= 0.3, the mixture's default is read from the world):
- a sample displaced by k mode standard deviations from its mode loses k^2 / 2 nats of teacher log-density, so a gap of
  2 nats in the MEAN log-density is what pushing every sample 2 std off its mode costs, and 10 nats means samples
  4.5 std off, between modes or outside the ring (neighbouring modes are 1.53 apart, 6 std at s = 0.25).
- the reward's standard deviation under the teacher is sqrt(2 + s^2) < 1.45, so the mean reward of 4000 evaluation
  samples has a Monte-Carlo standard error below 0.023 and a difference of two such means below 0.033.
"""

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
    return dmdr.resolve_defaults(dmdr.Args(**base))


def build_world(args):
    torch.manual_seed(args.seed)
    return dmdr.make_world(args, "cpu")


# =====================================================================================================
#                                       DynaRS and DynaDG schedules
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
def test_dynamic_renoise_sigma_distribution(step, a, b):
    """DynaRS at dynamic_steps = 500: Beta(4, 1.5) at step 0, Beta(2.5, 1.25) halfway (c = 1/2), U(0, 1) from 500 on;
    KS test at level 0.001 (critical value 0.031 for 4000 draws)."""
    torch.manual_seed(1)
    u = dmdr.dynamic_renoise_sigma(N_KS, step, 500, 4.0, 1.5)
    assert u.shape == (N_KS,) and bool(((u > 0) & (u < 1)).all())
    assert ks_statistic(u, lambda x: beta_cdf(a, b, x)) < KS_CRIT
    if step == 0:  # the test has power: the step-0 draws are far from U(0, 1) (KS distance of the two laws: 0.41)
        assert ks_statistic(u, lambda x: x) > 10 * KS_CRIT


def test_dynamic_renoise_sigma_off():
    """dynamic_steps = 0 switches DynaRS off: the same U(0, 1) draws DMD2 makes (torch.rand)."""
    torch.manual_seed(3)
    u = dmdr.dynamic_renoise_sigma(100, 0, 0)
    torch.manual_seed(3)
    assert torch.equal(u, torch.rand(100))


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


# =====================================================================================================
#                                           RT-DM weights
# =====================================================================================================


def test_reward_tilt_weights_by_hand():
    r = [1.0, -1.0, 2.0, 0.0]
    norm = math.sqrt((1 + 1 + 4 + 0) / 4)  # ||r|| = RMS of the batch = sqrt(1.5)
    e = [math.exp(v / norm) for v in r]
    expected = [v / (sum(e) / 4) for v in e]  # renormalised to mean 1
    got = dmdr.reward_tilt_weights(torch.tensor(r))
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(got.mean()) == pytest.approx(1.0, rel=1e-6)
    e2 = [math.exp(2 * v / norm) for v in r]  # beta = 2 doubles the exponent
    assert dmdr.reward_tilt_weights(torch.tensor(r), 2.0).tolist() == pytest.approx([v / (sum(e2) / 4) for v in e2], rel=1e-6)
    # scale-free: ||r|| makes the weights independent of the reward's units
    assert torch.allclose(dmdr.reward_tilt_weights(100 * torch.tensor(r)), got, rtol=1e-6)
    assert torch.equal(dmdr.reward_tilt_weights(torch.zeros(5)), torch.ones(5))
    assert torch.equal(dmdr.reward_tilt_weights(torch.full((7,), -3.0)), torch.ones(7))


def test_rt_dm_with_constant_reward_is_plain_dmd(tmp_path, monkeypatch):
    """With a constant reward every RT-DM weight is 1, so one stage-1 update with RT-DM equals the update without it
    (same seed, same draws), parameter for parameter."""
    monkeypatch.setattr(toy2d.ToyWorld, "reward", lambda self, x0, cond: torch.full((x0.shape[0],), 0.7))
    args = make_args(tmp_path, batch_size=64, fake_updates_per_step=2)
    updated = []
    for rt_dm in (True, False):
        a = replace(args, rt_dm=rt_dm)
        world = build_world(a)
        sigmas = dmdr.student_sigmas(world, a.student_steps)
        opt_g = torch.optim.AdamW(world.params("generator"), a.lr_generator, weight_decay=a.weight_decay_generator)
        opt_f = torch.optim.AdamW(world.params("fake"), a.lr_fake, weight_decay=0.0)
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
    with torch.no_grad():  # a fake score that differs from the teacher (at init the two are equal: zero gradient)
        for p in world.params("fake"):
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randn(6, 2, requires_grad=True)
    cond = world.sample_cond(6)
    t = torch.full((6,), 0.5)
    w = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.4, 1.0])
    grads = []
    for weights in (None, w):
        torch.manual_seed(5)
        (g,) = torch.autograd.grad(dmdr.dmdr_generator_loss(world, x0, cond, t, 1.0, 0.0, 1.0, weights), x0)
        grads.append(g)
    assert grads[0].abs().min() > 0
    # dmd_loss forms x - (x - grad) in float32: an absolute rounding error ~ 2 eps32 |x| / numel ~ 1e-7 per entry
    assert torch.allclose(grads[1], w[:, None] * grads[0], rtol=0, atol=1e-7)


# =====================================================================================================
#                                       RL losses, by hand
# =====================================================================================================


def test_dpo_loss_by_hand():
    # one pair (a winner and a loser): errors e_w = 1.0 vs ref 1.5 (policy fits the winner better), e_l = 2.0 vs ref 1.0
    # logit = -beta [(1.0 - 1.5) - (2.0 - 1.0)] = -0.5 * (-1.5) = 0.75; loss = -log sigmoid(0.75) = log(1 + e^-0.75)
    got = dmdr.dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.0]), beta=0.5)
    assert float(got) == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    # policy == reference: log 2 whatever the errors
    e = torch.tensor([0.3, 4.0])
    assert float(dmdr.dpo_loss(e, e.flip(0), e, e.flip(0), beta=3.0)) == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_rl_loss_reference_swap(tmp_path):
    """With the reference equal to the current generator the DPO loss is exactly log 2, the generator's parameters
    are restored after the swap, and a different reference changes the loss."""
    args = make_args(tmp_path)
    world = build_world(args)
    with torch.no_grad():
        for p in world.params("generator"):
            p.add_(0.05 * torch.randn_like(p))
    sigmas = dmdr.student_sigmas(world, 4)
    before = [p.detach().clone() for p in world.params("generator")]
    x_w, x_l = torch.randn(16, 2), torch.randn(16, 2)
    cond = world.sample_cond(16)
    loss_same = dmdr.dpo_rl_loss(world, cond, x_w, x_l, sigmas, before, beta=1.0)
    assert loss_same.item() == pytest.approx(math.log(2), abs=1e-6)
    zeros = [torch.zeros_like(p) for p in before]
    loss_other = dmdr.dpo_rl_loss(world, cond, x_w, x_l, sigmas, zeros, beta=1.0)
    assert abs(loss_other.item() - math.log(2)) > 1e-3
    for p, q in zip(world.params("generator"), before):
        assert torch.equal(p, q)
    loss_other.backward()  # the policy branch carries the gradient
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in world.params("generator"))


def test_grpo_advantages_and_loss_by_hand():
    # a group of 2: rewards 1 and 3 -> mean 2, population std 1 -> advantages -1, +1
    adv = dmdr.group_advantages(torch.tensor([1.0, 3.0]), 2, eps=0.0)
    assert adv.tolist() == [-1.0, 1.0]
    # ratios 1.5 and 0.5, clip 0.2: sample 1: min(1.5 * -1, 1.2 * -1) = -1.5; sample 2: min(0.5 * 1, 0.8 * 1) = 0.5
    logp_old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]]))
    assert float(dmdr.grpo_loss(logp, logp_old, adv, 0.2)) == pytest.approx(-(-1.5 + 0.5) / 2, rel=1e-6)
    # on-policy (ratio 1) the gradient is the REINFORCE one: d loss / d logp_i = -A_i / n
    logp = torch.tensor([[0.3], [-0.2]], requires_grad=True)
    (g,) = torch.autograd.grad(dmdr.grpo_loss(logp, logp.detach(), adv, 0.2), logp)
    assert g.flatten().tolist() == pytest.approx([0.5, -0.5])


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
    """DPO and GRPO push the right way: 20 RL-only updates from the teacher-initialised student raise the mean reward
    of 4000 evaluation samples by more than 0.5 (over 15 standard errors of 0.032; measured: +1.4 to +2.0)."""
    args = make_args(tmp_path, stage1_steps=0, stage2_steps=20, batch_size=64, rl=rl, dmd=False, dynamic_steps=0,
                     eval_every=20)
    run = dmdr.main(args)
    before, after = run["history"][0]["mean_reward"], run["final"]["mean_reward"]
    assert after > before + 0.5


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
    # the DMDR generator loss with DynaDG off and the fake score at scale 1 is DMD2's dmd_generator_loss
    out = []
    for fn in (lambda: dmdr.dmdr_generator_loss(world, x, cond, t, 1.0, 0.0, 1.0), lambda: dmd.dmd_generator_loss(world, x, cond, t, 1.0)):
        torch.manual_seed(4)
        loss = fn()
        out.append((loss, torch.autograd.grad(loss, x)[0]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# =====================================================================================================
#                                  bad input and non-finite rewards
# =====================================================================================================


@pytest.mark.parametrize("kw, message", [
    (dict(rl="ppo"), "valid RL losses: refl, dpo, grpo, none"),
    (dict(lambda_rl=-0.1), "lambda_rl"),
    (dict(dyna_rs_a=0.0), "dyna_rs_a"),
    (dict(dyna_rs_b=-1.0), "dyna_rs_b"),
    (dict(dynamic_steps=-1), "dynamic_steps"),
    (dict(rl="grpo", group_size=7), "group_size"),
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


# =====================================================================================================
#                                  the paper's claims on the toy
# =====================================================================================================

# Budgets: 600 stage-1 steps of 128 samples (the schedules anneal over 300), 200 stage-2 steps. The seed sweep behind
# these numbers is in the report of the issue (seeds 0-2).
S1, S2, BS = 600, 200, 128


@pytest.fixture(scope="module")
def stage1_arms(tmp_path_factory):
    """Stage 1 from the same initial generator with and without RT-DM (DynaDG and DynaRS on in both)."""
    out = tmp_path_factory.mktemp("stage1")
    runs = {}
    for name, rt_dm in (("dmd", False), ("rtdm", True)):
        args = make_args(out, stage1_steps=S1, stage2_steps=0, batch_size=BS, dynamic_steps=S1 // 2, eval_every=100,
                         rt_dm=rt_dm, run_name=name)
        runs[name] = dmdr.main(args)
    return runs


def late_mean(run, key, from_step, stage=1):
    """Mean of a metric over a run's evaluations of `stage` from step `from_step` on."""
    values = [h[key] for h in run["history"] if key in h and h.get("stage") == stage and h["step"] >= from_step]
    return sum(values) / len(values)


def test_claim_rt_dm_raises_reward_on_the_manifold(stage1_arms):
    """Claim 2 (paper fig. 5, stage 1): after the same stage-1 steps RT-DM has a higher reward than plain DMD and
    stays on the teacher's manifold. Averages over the evaluations at steps 300-600 (4 of them) damp the
    step-to-step wander of the mode masses. Reward margin 0.1 = 3 x the 0.032 standard error of a difference of two
    4000-sample means; 'on the manifold': mean teacher log-density within 1 nat of DMD's (each sample on average
    less than ~1.4 mode std further off its mode) and above the teacher's own samples' mean log-density minus 3.5 nats
    (on average within 3 mode std of a mode: 4.5 nats lost against the 1 nat a teacher sample loses on average)."""
    r_dmd, r_rt = late_mean(stage1_arms["dmd"], "mean_reward", S1 // 2), late_mean(stage1_arms["rtdm"], "mean_reward", S1 // 2)
    lp_dmd = late_mean(stage1_arms["dmd"], "teacher_logp", S1 // 2)
    lp_rt = late_mean(stage1_arms["rtdm"], "teacher_logp", S1 // 2)
    world = stage1_arms["rtdm"]["world"]
    teacher = world.mixture.sample(20000, torch.Generator().manual_seed(0))
    lp_teacher = float(world.mixture.log_prob(teacher).mean())  # (std error ~0.01)
    print(f"claim 2: reward dmd {r_dmd:.3f} rt-dm {r_rt:.3f}; teacher logp dmd {lp_dmd:.2f} rt-dm {lp_rt:.2f} "
          f"(teacher samples {lp_teacher:.2f})")
    assert r_rt > r_dmd + 0.1
    assert lp_rt > lp_dmd - 1.0
    assert lp_rt > lp_teacher - 3.5


@pytest.fixture(scope="module")
def stage2_arms(stage1_arms, tmp_path_factory):
    """Stage 2 from the RT-DM cold-start checkpoint: DMD only, joint DMD + ReFL, ReFL only (the schedules are over:
    dynamic_steps = 0)."""
    out = tmp_path_factory.mktemp("stage2")
    ckpt = stage1_arms["rtdm"]["run_dir"] / "checkpoint"
    runs = {}
    for name, kw in (("dmd_only", dict(rl="none")), ("joint", dict(rl="refl")), ("rl_only", dict(rl="refl", dmd=False))):
        args = make_args(out, stage1_steps=0, stage2_steps=S2, batch_size=BS, dynamic_steps=0, eval_every=50,
                         run_name=name, **kw)
        world = build_world(args)
        world.load("generator", ckpt)
        world.load("fake", ckpt)
        runs[name] = dmdr.main(args, world=world)
    runs["cold"] = stage1_arms["rtdm"]["final"]
    return runs


def test_claim_joint_dmd_rl_does_not_reward_hack(stage2_arms):
    """Claim 1 (paper fig. 4): from the same cold-start checkpoint RL alone raises the reward but leaves the teacher's
    manifold (mean teacher log-density 10+ nats below DMD-only's: samples on average 4.5 mode std off, between or
    outside the modes), while joint DMD + RL raises the reward (by more than 0.3: ten standard errors) and keeps the
    teacher log-density within 2 nats of DMD-only's. Metrics: means over the evaluations at steps 100, 150, 200, since
    DMD's own log-density wanders by a few nats between evaluations on the toy."""
    m = {k: {key: late_mean(v, key, S2 // 2, stage=2) for key in ("mean_reward", "teacher_logp")}
         for k, v in stage2_arms.items() if k != "cold"}
    cold = stage2_arms["cold"]
    print("claim 1:", {k: (round(v["mean_reward"], 3), round(v["teacher_logp"], 2)) for k, v in m.items()},
          "cold", (round(cold["mean_reward"], 3), round(cold["teacher_logp"], 2)))
    assert m["rl_only"]["mean_reward"] > cold["mean_reward"] + 1.0
    assert m["rl_only"]["teacher_logp"] < m["dmd_only"]["teacher_logp"] - 10.0
    assert m["joint"]["mean_reward"] > m["dmd_only"]["mean_reward"] + 0.3
    assert m["joint"]["mean_reward"] > cold["mean_reward"] + 0.3
    assert m["joint"]["teacher_logp"] > m["dmd_only"]["teacher_logp"] - 2.0


def misalign_generator(world, offset, steps=300, seed=0):
    """Fit the generator adapter so that G(x, sigma) = teacher x0 + offset at the student's levels: the student's
    samples are the teacher's shifted by `offset`, barely overlapping it."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(world.params("generator"), 3e-3)
    sigmas = torch.tensor(dmdr.student_sigmas(world, 4))
    for _ in range(steps):
        x = 2.5 * torch.randn(512, 2, generator=gen)
        sigma = sigmas[torch.randint(4, (512,), generator=gen)]
        cond = world.sample_cond(512)
        with torch.no_grad():
            target = world.x0("teacher", x, sigma, cond) + torch.tensor(offset)
        loss = ((world.x0("generator", x, sigma, cond) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_claim_dynamic_cold_start_is_faster(tmp_path):
    """Claim 3 (paper fig. 6): from a generator whose samples are the teacher's shifted by 3 (energy distance ~9,
    floor 0.002), DynaDG + DynaRS reach a lower energy distance after N = 36 steps than plain DMD (dmd.py's settings:
    fake scale 1, U renoise), both arms starting from the same misaligned adapter. N is mid-way through plain DMD's
    descent (ED ~9 at step 0, ~0.05 by step 50; afterwards both arms wander between 0.03 and 0.6 as DMD on the toy
    does, which would drown a speed-up). One run's ED at step 36 varies by a factor ~2 across seeds, so the claim is
    tested on the mean over seeds 1-5 (every seed run, none dropped): dynamic < 0.75 x plain (measured: 0.63;
    dynamic is behind in 2 of the 5 seeds)."""
    n, eds = 36, {"plain": [], "dynamic": []}
    for seed in range(1, 6):
        start = tmp_path / f"start{seed}"
        for name, kw in (("plain", dict(dyna_dg=False, dyna_rs=False, lora_scale_f=1.0)), ("dynamic", dict())):
            args = make_args(tmp_path, stage1_steps=n, stage2_steps=0, batch_size=BS, dynamic_steps=60, eval_every=n,
                             eval_samples=2000, rt_dm=False, seed=seed, run_name=f"{name}{seed}", **kw)
            world = build_world(args)
            if name == "plain":
                misalign_generator(world, (3.0, 0.0), seed=seed)
                world.save("generator", start)
            world.load("generator", start)
            run = dmdr.main(args, world=world)
            assert run["history"][0]["energy_distance"] > 5.0  # the start barely overlaps the teacher
            eds[name].append(run["final"]["energy_distance"])
    plain, dynamic = sum(eds["plain"]) / 5, sum(eds["dynamic"]) / 5
    print(f"claim 3: energy distance at step {n}, seeds 1-5: {eds}; means plain {plain:.3f} dynamic {dynamic:.3f}")
    assert dynamic < 0.75 * plain

"""Tests of gdmd.py: the NFT-to-DMD identity (exact), constant reward = DMD, advantages by hand, snapshots, bad input,
and GDMD's claims on the toy (seeded, small budgets)."""

import json
import math
import statistics

import pytest
import torch

import dmd
import gdmd
import toy2d


def perturbed_world(seed=0):
    """A toy world whose fake and generator adapters differ from the teacher (their zero-initialised last layers
    get random weights), so DMD steps are non-zero and differ between renoise levels."""
    world = toy2d.ToyWorld(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for role in ("fake", "generator"):
            for p in world.params(role):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return world


def generator_grads(world, loss_fn, seed):
    """Gradient of loss_fn(x0, cond) w.r.t. the generator adapter, x0 from a fixed backward-simulated batch."""
    torch.manual_seed(seed)
    cond = world.sample_cond(64)
    x_k = world.noise(cond)
    x0 = world.x0("generator", x_k, 0.75, cond)
    torch.manual_seed(seed + 1)
    loss = loss_fn(x0, cond)
    grads = torch.autograd.grad(loss, world.params("generator"))
    return torch.cat([g.flatten() for g in grads])


# ---------------------------------------------------------------------------------------------------------------------
# the identity (eq. 5 of gdmd.py's docstring), exactly
# ---------------------------------------------------------------------------------------------------------------------


def test_nft_gradient_at_old_policy_is_advantage_weighted_dmd_steps():
    # Hand-built group: B = 2 samples, n = 3 targets, D = 3; beta != 1 and A_max = 2 with one advantage beyond the clip,
    # to show that beta and A_max cancel and that the clipped advantage is the one that acts.
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([
        [[0.1, -0.2, 0.3], [0.4, 0.0, -0.1], [-0.3, 0.2, 0.2]],
        [[0.05, 0.05, -0.6], [-0.2, 0.1, 0.1], [0.3, -0.4, 0.0]],
    ], dtype=torch.float64)
    adv = torch.tensor([[1.0, -0.5, -0.5], [3.0, -1.0, 0.25]], dtype=torch.float64)
    x_hat = (x.detach().unsqueeze(1) - g)
    loss = gdmd.nft_loss(x, x.detach(), x_hat, adv, adv_clip=2.0, beta=0.7)
    (grad,) = torch.autograd.grad(loss, x)

    B, n, D = 2, 3, 3
    a = adv.clamp(-2.0, 2.0)  # 3.0 acts as 2.0
    m = g.abs().mean(-1)  # (B, n) DiffusionNFT's weight at x = x_old
    c = 2.0 / (B * n * D * m)
    expected = (c[..., None] * a[..., None] * g).sum(1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # and by hand for one entry: sample 0, coordinate 0
    by_hand = sum(2 / (6 * 3 * m[0, j]) * a[0, j] * g[0, j, 0] for j in range(3))
    assert abs(grad[0, 0].item() - by_hand.item()) < 1e-14


def test_gdmd_update_is_reward_weighted_sum_of_group_dmd_steps():
    # Eq. (5) on the toy world: d L / d x_b = 1/(B n D) sum_j (1 + 2 lambda A_bj / m_bj) g_bj, the g_bj and A_bj
    # recomputed from the same random stream.
    world = perturbed_world()
    torch.manual_seed(0)
    cond = world.sample_cond(32)
    x0 = (world.mixture.sample(32, torch.Generator().manual_seed(1), cond).float() + 0.3).requires_grad_(True)
    n, lam = 4, 0.3
    t = 0.02 + 0.96 * torch.rand(32, n)
    torch.manual_seed(7)
    loss, _ = gdmd.gdmd_generator_loss(world, x0, cond, t, 1.0, lam, 5.0, "levels", n)
    (grad,) = torch.autograd.grad(loss, x0)

    torch.manual_seed(7)
    g = gdmd.dmd_target_group(world, x0.detach(), cond, t, 1.0, list(range(n)), [0] * n)
    r = world.reward((x0.detach()[:, None] - g).flatten(0, 1), cond.repeat_interleave(n)).view(32, n)
    a = gdmd.group_advantages(r, 5.0)
    m = g.abs().mean(-1)
    expected = ((1 + 2 * lam * a / m)[..., None] * g).sum(1) / (32 * n * 2)
    assert (a.abs().amax(1) > 0.5).all()  # every group's rewards vary: the RL term is not trivially zero
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_constant_reward_gives_exactly_the_dmd_gradient(monkeypatch):
    world = perturbed_world()
    monkeypatch.setattr(world, "reward", lambda x0, cond: torch.full((x0.shape[0],), 2.5))
    t1 = 0.02 + 0.96 * torch.rand(64, 1, generator=torch.Generator().manual_seed(3))

    # n = 1, "levels": exactly dmd.py's generator loss (same renoise time, same noise draw)
    ref = generator_grads(world, lambda x0, c: dmd.dmd_generator_loss(world, x0, c, t1[:, 0], 1.0), seed=5)
    got = generator_grads(world, lambda x0, c: gdmd.gdmd_generator_loss(world, x0, c, t1, 1.0, 0.7, 5.0, "levels", 1)[0],
                          seed=5)
    assert ref.abs().max() > 1e-4
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)

    # n = 4, "levels": the average of dmd.py's loss over the 4 levels (noise drawn level by level, in order)
    t4 = 0.02 + 0.96 * torch.rand(64, 4, generator=torch.Generator().manual_seed(4))
    ref4 = generator_grads(
        world, lambda x0, c: sum(dmd.dmd_generator_loss(world, x0, c, t4[:, j], 1.0) for j in range(4)) / 4, seed=6)
    got4 = generator_grads(
        world, lambda x0, c: gdmd.gdmd_generator_loss(world, x0, c, t4, 1.0, 0.7, 5.0, "levels", 4)[0], seed=6)
    torch.testing.assert_close(got4, ref4, rtol=1e-6, atol=1e-10)

    # and the same with naive fusion (a constant raw-sample reward): still exactly DMD
    got4n = generator_grads(
        world, lambda x0, c: gdmd.gdmd_generator_loss(world, x0, c, t4, 1.0, 0.7, 5.0, "levels", 4,
                                                      naive_fusion=True)[0], seed=6)
    torch.testing.assert_close(got4n, ref4, rtol=1e-6, atol=1e-10)


def test_non_constant_reward_changes_the_gradient():
    # the counterpart of the test above: with the toy's linear reward the GDMD gradient differs from DMD's
    world = perturbed_world()
    t4 = 0.02 + 0.96 * torch.rand(64, 4, generator=torch.Generator().manual_seed(4))
    ref4 = generator_grads(
        world, lambda x0, c: sum(dmd.dmd_generator_loss(world, x0, c, t4[:, j], 1.0) for j in range(4)) / 4, seed=6)
    got4 = generator_grads(
        world, lambda x0, c: gdmd.gdmd_generator_loss(world, x0, c, t4, 1.0, 0.7, 5.0, "levels", 4)[0], seed=6)
    assert (got4 - ref4).norm() > 0.1 * ref4.norm()


# ---------------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.1, 0.1], [-1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    adv = gdmd.group_advantages(r, adv_clip=1.5)
    # row 0: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5); 3 / (sqrt(3.5) + 1e-4) = 1.6035 -> clip 1.5
    s = math.sqrt(3.5) + 1e-4
    expected0 = [-2 / s, -1 / s, 0.0, 1.5]
    assert adv[0].tolist() == pytest.approx(expected0, abs=1e-12)
    # row 1: equal rewards (whose float mean is not exactly 0.1) give exactly zero, not NaN
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # row 2: mean 0, std 1 -> +-1 / (1 + 1e-4)
    assert adv[2].tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, -1 / 1.0001, 1 / 1.0001], abs=1e-12)
    # a group of one target has nothing to compare with: zero
    assert gdmd.group_advantages(torch.tensor([[3.0]]), 5.0).tolist() == [[0.0]]
    assert torch.isfinite(adv).all()


# ---------------------------------------------------------------------------------------------------------------------
# fake-score snapshots
# ---------------------------------------------------------------------------------------------------------------------


def test_snapshots_swap_in_and_restore_exactly():
    world = perturbed_world()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    cond = world.sample_cond(16)
    snaps = gdmd.FakeSnapshots(size=2)
    with torch.no_grad():
        before = world.x0("fake", x, 0.5, cond)
        snaps.push(world)  # snapshot 1 = the state "before"
        for p in world.params("fake"):
            p.add_(0.1)
        live = world.x0("fake", x, 0.5, cond)
        with snaps.swapped_in(world, 1):
            swapped = world.x0("fake", x, 0.5, cond)
        after = world.x0("fake", x, 0.5, cond)
    assert (live - before).abs().max() > 1e-3
    assert torch.equal(swapped, before) and torch.equal(after, live)
    assert world.params("fake")[0].requires_grad  # the swap leaves requires_grad alone
    # a "snapshots" group whose snapshots all equal the live fake: identical targets, zero advantages
    snaps2 = gdmd.FakeSnapshots(size=3)
    snaps2.push(world)
    x0 = world.mixture.sample(16, torch.Generator().manual_seed(2), cond).float()
    t = torch.full((16, 1), 0.5)
    g = gdmd.dmd_target_group(world, x0, cond, t, 1.0, *gdmd.group_layout("snapshots", 4)[:2], snaps2)
    assert torch.equal(g[:, 0], g[:, 3]) and g.abs().max() > 0
    r = world.reward((x0[:, None] - g).flatten(0, 1), cond.repeat_interleave(4)).view(16, 4)
    assert gdmd.group_advantages(r, 5.0).abs().max() == 0


def test_marked_copies_agree_with_dmd():
    import inspect
    import re

    names = re.findall(r"^# Copied from dmd.py: (\w+)$", inspect.getsource(gdmd), re.M)
    assert {"dmd_grad", "dmd_loss", "fake_score_loss", "dmd_generator_loss", "generator_sample"} <= set(names)
    for name in names:
        assert inspect.getsource(getattr(gdmd, name)) == inspect.getsource(getattr(dmd, name)), name


# ---------------------------------------------------------------------------------------------------------------------
# bad input and failures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 0, "group_size"),
    ("lambda_gdmd", -0.1, "lambda_gdmd"),
    ("lambda_gdmd", float("nan"), "lambda_gdmd"),
    ("group_source", "pixels", "unknown group source"),
    ("adv_clip", 0.0, "adv_clip"),
    ("cold_start_steps", 20, "cold_start_steps"),
])
def test_bad_input_fails_before_training(tmp_path, field, value, message):
    args = gdmd.Args(output_dir=str(tmp_path), progress=False, **{"num_steps": 10, "cold_start_steps": 5, field: value})
    with pytest.raises(ValueError, match=message):
        gdmd.main(args)
    assert not any(tmp_path.iterdir())  # no run directory: nothing started


def test_non_finite_reward_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(toy2d.ToyWorld, "reward", lambda self, x0, cond: torch.full((x0.shape[0],), float("nan")))
    args = gdmd.Args(output_dir=str(tmp_path), run_name="nan", progress=False, num_steps=4, cold_start_steps=2,
                     batch_size=32, eval_samples=200)
    with pytest.raises(FloatingPointError, match="gdmd_loss is nan at step 3"):
        gdmd.main(args)
    assert (tmp_path / "nan" / "checkpoint" / "generator.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# claims on the toy: one plain-DMD cold start, then three arms with the same budget from its checkpoint, three seeds.
#   dmd    lambda_gdmd = 0   (group-averaged DMD: the same compute and random stream as GDMD, the reward term off)
#   gdmd   lambda_gdmd = 0.2 (rewards scored on the DMD targets)
#   naive  lambda_gdmd = 0.2, --naive-fusion (the raw sample's reward)
# Each arm is summarised by the average of its evaluations after step 0 (every 25 steps, fixed evaluation noise),
# which averages over the slow mode-mass oscillation that DMD itself shows on the ring.
# ---------------------------------------------------------------------------------------------------------------------

CLAIM = dict(batch_size=128, eval_samples=1000, progress=False)
COLD_STEPS, ARM_STEPS, LAM, SEEDS = 400, 150, 0.2, (0, 1, 2)


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gdmd_claims")
    cold = gdmd.main(gdmd.Args(output_dir=str(out_dir), run_name="cold", num_steps=COLD_STEPS,
                               cold_start_steps=COLD_STEPS, eval_every=COLD_STEPS, **CLAIM))
    checkpoint = cold["run_dir"] / "checkpoint"
    results = {}
    for seed in SEEDS:
        for arm, extra in (("dmd", dict(lambda_gdmd=0.0)), ("gdmd", dict(lambda_gdmd=LAM)),
                           ("naive", dict(lambda_gdmd=LAM, naive_fusion=True))):
            args = gdmd.Args(output_dir=str(out_dir), run_name=f"{arm}_{seed}", seed=seed, init_checkpoint=str(checkpoint),
                             cold_start_steps=0, num_steps=ARM_STEPS, eval_every=25, **extra, **CLAIM)
            try:
                history = gdmd.main(args)["history"]
            except FloatingPointError:  # a run that blows up has left the manifold for good
                results[arm, seed] = {"reward": float("nan"), "logp": -math.inf, "diverged": True}
                continue
            evals = [r for r in history if "teacher_logp" in r and r["step"] > 0]
            results[arm, seed] = {
                "reward": statistics.mean(r["mean_reward"] for r in evals),
                "logp": statistics.mean(r["teacher_logp"] for r in evals),
                "diverged": False,
            }
    print("\n" + json.dumps({f"{a}/{s}": v for (a, s), v in results.items()}, indent=1))
    return out_dir, results


def test_run_directory_has_figures_and_both_stages(arms):
    out_dir, _ = arms
    run = out_dir / "gdmd_0"
    for name in ("config.json", "metrics.jsonl", "samples.png", "curves.png", "checkpoint/generator.pt", "checkpoint/fake.pt"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gdmd"] == 1 and "nft_loss" in r for r in records if "dmd_loss" in r)
    cold = [json.loads(line) for line in (out_dir / "cold" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gdmd"] == 0 and "nft_loss" not in r for r in cold if "dmd_loss" in r)


def test_gdmd_raises_reward_over_dmd_and_keeps_teacher_logp(arms):
    _, res = arms
    diffs = [res["gdmd", s]["reward"] - res["dmd", s]["reward"] for s in SEEDS]
    # Paired over seeds (same checkpoint, same random stream): a one-sided t-test at 5 % with 2 degrees of freedom
    # needs mean / (sd / sqrt(3)) > 2.92.
    t_stat = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))
    assert all(d > 0 for d in diffs) and t_stat > 2.92, (diffs, t_stat)
    # "Near": GDMD's teacher log-density (seed mean) is no lower than DMD-only's by more than DMD-only's own
    # seed-to-seed spread (sample sd over the seeds). Measured (per-step backbone): reward +0.20 / +0.24 / +0.10 over
    # DMD-only (t = 4.4), log-density -2.27 against -2.27 (seed means); on the final-step fake this bound fails (-0.08).
    logp_dmd = [res["dmd", s]["logp"] for s in SEEDS]
    logp_gdmd = [res["gdmd", s]["logp"] for s in SEEDS]
    assert statistics.mean(logp_gdmd) >= statistics.mean(logp_dmd) - statistics.stdev(logp_dmd), (logp_gdmd, logp_dmd)


def test_naive_fusion_is_not_worse_than_gdmd_on_the_per_step_backbone(arms):
    """NOT reproduced on the per-step backbone (the default): "scoring the raw sample leaves the manifold". On DMD2's
    mixture estimator naive fusion's teacher log-density was 0.20-0.26 below GDMD's on every seed; with a fake per
    student step it is within 0.05 of GDMD's (-0.04 / +0.02 / -0.04, seeds 0-2) and it raises the reward MORE (+0.02 /
    +0.10 / +0.16 over GDMD). Asserted as the measured fact (seeded, so it is exact here): naive fusion's reward is at
    least GDMD's on every seed, and its log-density is within 0.1 nats of GDMD's, half the smallest gap the claim had
    on the mixture backbone (measured gaps at most 0.044)."""
    _, res = arms
    for s in SEEDS:
        naive, ours = res["naive", s], res["gdmd", s]
        assert not naive["diverged"] and naive["reward"] >= ours["reward"], (s, naive, ours)
        assert abs(naive["logp"] - ours["logp"]) < 0.1, (s, naive, ours)

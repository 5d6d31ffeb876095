"""Stage 2's machinery: PPO's clip (inactive with one epoch per rollout, as the authors run it; it bites with two), and
the generator EMA against its closed form and against the authors' training loops written out step by step
(configs/cold_start: decay 0.99 every global step; configs/rtdmd: min((1 + s) / (10 + s), 0.9) every 8th update,
called once per sub-batch), plus a run whose evaluation and checkpoint use the EMA weights."""

import copy

import pytest
import torch

import rtdmd
import toy2d


def perturbed_world(seed=0):
    world = toy2d.ToyWorld(seed=seed)
    gen = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for role in ("generator", "fake"):
            for p in world.params(role):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return world


@pytest.mark.parametrize("epochs", [1, 2])
def test_ppo_clip_is_inactive_with_one_epoch_and_bites_with_two(epochs):
    """From the same state and seed, clip ranges 1e-5 and 1e6 give bit-identical updates with one epoch per rollout
    (the ratio pi / pi_old is exactly 1: the old log-probabilities come from the rollout's own forward pass) and
    different ones with two (the second epoch's ratio moved away from 1 by more than 1e-5)."""
    base = perturbed_world()
    schedule = rtdmd.student_schedule(base, 4)
    params = []
    for clip in (1e-5, 1e6):
        world = copy.deepcopy(base)
        args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(groups=4, group_size=8, clip_range=clip,
                                                                     ppo_epochs=epochs)))
        opt_g, opt_f = rtdmd.make_optimizers(world, args, 2)
        torch.manual_seed(3)
        rtdmd.rl_update(world, args, schedule, opt_g, opt_f)
        params.append(torch.cat([p.detach().flatten() for p in world.params("generator")]))
    same = torch.equal(params[0], params[1])
    assert same == (epochs == 1), (epochs, (params[0] - params[1]).abs().max())


def test_ema_update_is_its_closed_form():
    """After updates toward p_1..p_T at decay d: ema_T = d^T e_0 + sum_i (1 - d) d^(T - i) p_i."""
    gen = torch.Generator().manual_seed(0)
    e0 = [torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    targets = [[torch.randn_like(t) for t in e0] for _ in range(5)]
    ema = [t.clone() for t in e0]
    for p in targets:
        rtdmd.ema_update(ema, p, 0.9)
    for j in range(2):
        closed = 0.9**5 * e0[j] + sum(0.1 * 0.9 ** (5 - i) * targets[i - 1][j] for i in range(1, 6))
        assert torch.allclose(ema[j], closed, rtol=1e-12, atol=1e-14)
    assert rtdmd.ema_ramp_decay(0, 0.9) == pytest.approx(0.1) and rtdmd.ema_ramp_decay(80, 0.9) == 0.9
    assert rtdmd.ema_ramp_decay(7, 0.9) == pytest.approx(8 / 17)


def weight_sequence(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, generator=gen, dtype=torch.float64)] for _ in range(n + 1)]


def test_stage1_ema_is_the_authors_per_global_step_ema(monkeypatch):
    """The authors (dmd_trainer.py): at global step g a fake update, a generator update when (g + 1) % 10 == 0, then
    ema <- 0.99 ema + 0.01 theta. Ours: train_step's stage 1 with 10 fake updates per round; with the fake and
    generator updates replaced by a known weight sequence theta_1, theta_2, ... the two EMAs agree after 7 rounds."""
    rounds, ttur = 7, 10
    thetas = weight_sequence(rounds)
    world = toy2d.ToyWorld()
    current = [thetas[0][0].clone()]
    world.params = lambda role: current  # the 'generator' is one tensor the test moves
    counter = {"round": 0}

    def cold_update(world_, args_, schedule_, opt_generator_):
        counter["round"] += 1
        current[0].copy_(thetas[counter["round"]][0])
        return {"dm_loss": 0.0, "student_step": 1}

    monkeypatch.setattr(rtdmd, "cold_update", cold_update)
    monkeypatch.setattr(rtdmd, "fake_update", lambda *a, **k: (0.0, 0.0))
    monkeypatch.setattr(rtdmd, "simulate_states", lambda *a, **k: None)
    args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(fake_updates_per_step=ttur, ema_decay=0.99, batch_size=4)))
    schedule = rtdmd.student_schedule(world, 4)
    ours = [thetas[0][0].clone()]
    for _ in range(rounds):
        rtdmd.train_step(world, args, schedule, 1, None, None, ema=ours)

    theirs, theta = thetas[0][0].clone(), thetas[0][0].clone()
    for g in range(rounds * ttur):
        if (g + 1) % ttur == 0:
            theta = thetas[(g + 1) // ttur][0]
        theirs += 0.01 * (theta - theirs)
    assert torch.allclose(ours[0], theirs, rtol=1e-12, atol=1e-14)


def test_stage2_ema_is_the_authors_sub_batch_ema():
    """The authors (rtdmd_trainer.py, utils/ema.py): per epoch 16 sub-batches; the optimiser steps at the end of the
    last one (global step s += 1); after each sub-batch ema.step(params, s) updates when (s + 1) % 8 == 0 with decay
    min((1 + s) / (10 + s), 0.9). Ours: ema_update_rl after update u. Equal after 40 updates (5 firings)."""
    updates = 40
    thetas = weight_sequence(updates, seed=2)
    ours = [thetas[0][0].clone()]
    for u in range(1, updates + 1):
        rtdmd.ema_update_rl(ours, thetas[u], u, 0.9, 8, 16)

    theirs, s, params = thetas[0][0].clone(), 0, thetas[0][0]
    for _ in range(updates):
        for b in range(16):
            if b == 15:  # the sync step: the optimiser steps, then the counter moves
                params, s = thetas[s + 1][0], s + 1
            if (s + 1) % 8 == 0:
                theirs += (1 - min((1 + s) / (10 + s), 0.9)) * (params - theirs)
    assert torch.allclose(ours[0], theirs, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours[0], thetas[updates][0])  # an average, not the last weights


def test_evaluation_and_checkpoint_use_the_ema(tmp_path):
    """A run with the EMA on: checkpoint/generator.pt holds the EMA weights (what is evaluated, what eval.py loads),
    checkpoint/raw/generator.pt the trained ones; the last evaluation record is the EMA student's."""
    args = rtdmd.Args(output_dir=str(tmp_path), run_name="ema", progress=False, cold_steps=3, rl_steps=8, batch_size=16,
                      groups=2, group_size=4, eval_samples=256, ema_decay=0.99, ema_decay_rl=0.9, ema_every_rl=4,
                      log_every=100)
    out = rtdmd.main(args)
    world, ema = out["world"], out["ema"]
    saved = torch.load(out["run_dir"] / "checkpoint" / "generator.pt")
    raw = torch.load(out["run_dir"] / "checkpoint" / "raw" / "generator.pt")
    names = list(world.adapters["generator"].state_dict())
    params = dict(zip([n for n, _ in world.adapters["generator"].named_parameters()], world.params("generator")))
    ema_by_name = dict(zip(params, ema))
    assert all(torch.equal(saved[n], ema_by_name[n]) for n in params)
    assert all(torch.equal(raw[n], params[n].detach()) for n in params)
    assert any(not torch.equal(saved[n], raw[n]) for n in params) and set(saved) == set(names)
    with rtdmd.ema_weights(world, ema):
        _, _, metrics = rtdmd.evaluate(world, rtdmd.student_schedule(world, 4), args.eta, 256, args.seed + 1, 1.0)
    assert out["final"]["energy_distance"] == metrics["energy_distance"]

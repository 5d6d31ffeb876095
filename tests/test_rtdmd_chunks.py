"""--micro-batch-size: every update split into chunks whose gradients accumulate into one optimiser step equals the
unchunked update. All random draws of an update are made for the whole batch before the chunks run, so the two differ
only by floating-point summation order.
  * toy, float64, both stage 2 recipes and the exact-tilt target: one stage 1 iteration (5 fake updates, the AC-DMD
    generator update, the EMA) and one stage 2 update, chunks of 7 rows, SGD steps (linear in the gradient): the
    adapters agree to 1e-9 relative (float64 round-off: <= 256 rows x 1.1e-16 per sum, amplified by at most ~1e4
    through the MLP, is < 3e-10);
  * tiny SD3 (float32, a random 1-block MMDiT, 4 x 4 latents of 4 channels, the tiny CLIP reward through the VAE):
    the stage 1 fake / generator gradients and the stage 2 gradients with chunks of 1 row against 4 rows, within
    float32 round-off (the bound: 1e-4 relative, ~1e3 float32 ulps accumulated through the forward and backward;
    measured 0.6e-6 to 1.3e-6)."""

import copy

import pytest
import torch

import rtdmd
import toy2d


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def toy_world():
    world = toy2d.ToyWorld(seed=0)
    for adapter in world.adapters.values():
        adapter.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for role in ("generator", "fake"):
            for p in world.params(role):
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return world


def sgd(world):
    return torch.optim.SGD(world.params("generator"), lr=0.05), torch.optim.SGD(world.params("fake"), lr=0.05)


def flat(world, ema=None):
    out = [p.detach().flatten() for role in ("generator", "fake") for p in world.params(role)]
    return torch.cat(out + [e.flatten() for e in (ema or [])])


@pytest.mark.parametrize("recipe,target", [("paper", "teacher"), ("natural", "teacher"), ("paper", "tilted")])
def test_toy_chunked_updates_equal_the_unchunked(float64, recipe, target):
    base = toy_world()
    schedule = rtdmd.student_schedule(base, 4)
    results = []
    for micro in (None, 7):
        world = copy.deepcopy(base)
        args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(
            stage2_recipe=recipe, dm_target=target, micro_batch_size=micro, groups=8, group_size=8, ema_decay=0.99)))
        tilted = world.reward_fn.tilt(world.mixture, 1.0) if target == "tilted" else None
        opt_g, opt_f = sgd(world)
        ema = [p.detach().clone() for p in world.params("generator")]
        torch.manual_seed(5)
        rtdmd.train_step(world, args, schedule, 1, opt_g, opt_f, ema)
        rtdmd.train_step(world, args, schedule, 2, opt_g, opt_f, None, tilted)
        results.append(flat(world, ema))
    before = flat(base, [p for p in base.params("generator")])
    assert not torch.allclose(results[0], before)  # the updates did something
    assert torch.allclose(results[1], results[0], rtol=1e-9, atol=1e-12), (results[1] - results[0]).abs().max()


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from t2i import T2IWorld
    from t2i.tiny import build_tiny_clip, build_tiny_sd3

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_sd3(root / "sd3")
    build_tiny_clip(root / "clip")
    world = T2IWorld("sd3-medium", model_path=str(root / "sd3"), resolution=8, reward="clip",
                     reward_checkpoints={"clip": str(root / "clip")}, lora_rank=2, lora_alpha=4, fake_lora_rank=2,
                     fake_lora_alpha=4, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for role in ("generator", "fake"):
            for p in world.params(role):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return world


def gradients(world, roles=("generator", "fake")):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for role in roles for p in world.params(role)])


def test_tiny_sd3_chunked_updates_equal_the_unchunked(tiny_sd3):
    world = tiny_sd3
    schedule = rtdmd.student_schedule(world, 3)
    out = {}
    for micro in (None, 1):
        args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(
            model="sd3-medium", t2i_reward="clip", micro_batch_size=micro, batch_size=4, groups=2, group_size=2,
            student_steps=3, guidance_scale=2.0)))
        opt_g = torch.optim.SGD(world.params("generator"), lr=0.0)  # lr 0: the weights stay, the gradients are compared
        opt_f = torch.optim.SGD(world.params("fake"), lr=0.0)
        torch.manual_seed(7)
        cond = world.sample_cond(4)
        x_s = rtdmd.simulate_states(world, cond, schedule, args.eta, 1, micro)
        rtdmd.fake_update(world, args, opt_f, x_s, schedule[1], cond)
        fake_grad = gradients(world, ("fake",))
        rtdmd.cold_update(world, args, schedule, opt_g)
        cold_grad = gradients(world, ("generator",))
        logs = rtdmd.rl_update(world, args, schedule, opt_g, opt_f)
        out[micro] = (x_s, fake_grad, cold_grad, gradients(world, ("generator",)), logs)
    (x_a, *grads_a, logs_a), (x_b, *grads_b, logs_b) = out[None], out[1]
    torch.testing.assert_close(x_b, x_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert float(a.norm()) > 0
        assert float((a - b).norm()) <= 1e-4 * float(a.norm()), float((a - b).norm() / a.norm())
    assert logs_a["reward"] == pytest.approx(logs_b["reward"], rel=1e-5)
